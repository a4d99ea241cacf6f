"""The configuration: one typed object from defaults, a TOML file, the environment and flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cachebind.config import Settings, load_config


def test_defaults_are_the_released_imagebind_llm_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("CACHEBIND_"):
            monkeypatch.delenv(name)
    settings = load_config()
    assert (settings.cache.k, settings.cache.t, settings.cache.alpha) == (10, 20.0, 0.5)
    assert settings.llm.temperature == 0.1 and settings.llm.top_p == 0.75
    assert settings.llm.max_new_tokens == 256
    assert settings.serve.host == "127.0.0.1"
    assert settings.store.table == "images"


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "cachebind.toml"
    config.write_text('[cache]\nk = 5\nt = 100.0\n[store]\nuri = "/data/lancedb"\n')
    monkeypatch.setenv("CACHEBIND_CACHE__T", "50")
    settings = load_config(config, store={"table": "cc3m"})
    assert settings.cache.k == 5  # from the file
    assert settings.cache.t == 50.0  # the environment beats the file
    assert settings.store.uri == "/data/lancedb"
    assert settings.store.table == "cc3m"  # flags beat everything


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[index]\nrecall_target = 0.99\n")
    monkeypatch.setenv("CACHEBIND_CONFIG", str(config))
    assert load_config().index.recall_target == 0.99


def test_unknown_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[cache]\nkk = 5\n")
    with pytest.raises(ValidationError, match="kk"):
        load_config(config)
    with pytest.raises(ValidationError):
        load_config(store={"vector_dtype": "int8"})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


def test_flags_set_to_none_leave_values_alone() -> None:
    settings = load_config(cache={"k": None, "alpha": 0.25})
    assert settings.cache.k == 10 and settings.cache.alpha == 0.25
    assert isinstance(settings, Settings)
