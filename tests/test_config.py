"""The configuration: one typed object from defaults, a TOML file, the environment and flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cachebind.config import IndexConfig, Settings, load_config


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


def test_s3_options_from_file_environment_and_standard_aws_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(__import__("os").environ):
        if name.startswith(("AWS_", "CACHEBIND_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:9000")
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    s3 = load_config().store.s3  # nothing of cachebind's own set: the AWS variables
    assert (s3.endpoint_url, s3.region, s3.access_key_id) == (
        "http://aws-env:9000",
        "eu-north-1",
        "env-key",
    )
    assert s3.secret_access_key.get_secret_value() == "env-secret"
    assert s3.http_allowed  # an http:// endpoint asks for plain HTTP

    config = tmp_path / "c.toml"
    config.write_text(
        '[store]\nuri = "s3://bucket/cache"\n'
        '[store.s3]\nendpoint_url = "https://file:9000"\nregion = "us-west-2"\n'
    )
    monkeypatch.setenv("CACHEBIND_STORE__S3__REGION", "ap-south-1")
    settings = load_config(config)
    assert settings.store.uri == "s3://bucket/cache"
    assert settings.store.s3.endpoint_url == "https://file:9000"  # the file beats AWS_*
    assert settings.store.s3.region == "ap-south-1"  # CACHEBIND_* beats the file
    assert settings.store.s3.access_key_id == "env-key"  # unset: still the AWS variable
    assert not settings.store.s3.http_allowed

    # `cachebind config` prints the merged settings, never the secrets.
    printed = settings.model_dump(mode="json")["store"]["s3"]
    assert printed["secret_access_key"] == "**********" and "env-secret" not in str(printed)


def test_index_dir_on_an_object_store_is_refused_with_the_reason() -> None:
    for uri in ("s3://bucket/index", Path("s3://bucket/index"), "gs://b/i"):
        with pytest.raises(ValidationError, match="index.dir must be a local directory"):
            IndexConfig(dir=uri)
    with pytest.raises(ValidationError, match="atomic directory renames"):
        load_config(index={"dir": "s3://bucket/index"})
    assert IndexConfig(dir="/srv/index").dir == Path("/srv/index")
