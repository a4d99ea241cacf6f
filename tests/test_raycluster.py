"""Which Ray a command runs on: the configured address, a submitted job's cluster, or a new local
instance -- never another Ray that happens to run on the same machine."""

from __future__ import annotations

import pytest

from cachebind.raycluster import ray_address


def test_a_configured_address_is_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address("auto") == "auto"
    assert ray_address("ray://head:10001") == "ray://head:10001"


def test_unset_inside_a_submitted_job_joins_the_jobs_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(None) is None  # Ray's default reads RAY_ADDRESS


def test_unset_elsewhere_starts_a_new_local_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == "local"
    assert ray_address("") == "local"
