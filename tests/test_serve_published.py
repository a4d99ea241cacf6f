"""The production path: ``start_server(settings)`` loads the encoder and the index that
``indexing`` published, and an admin reload (or the poll loop) moves to a newer version."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from builders import append_rows, build_demo_cache, service_settings

import indexing
from cachebind.config import EncoderConfig, WeightsConfig
from cachebind.serve import start_server
from cachebind.store import CacheTable, EncoderMismatchError, row_id
from cachebind.store.identity import configured_encoder


def tmp_root(cache):
    """The folder the demo cache lives in (no response to a user key may name it)."""
    return cache.store.uri.rsplit("/", 1)[0]


@pytest.fixture
def published(tmp_path):
    cache = build_demo_cache(tmp_path, rows=200, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0)
    svc.settings.index.use_gpu = "no"
    manifest = indexing.build(
        CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
    )
    return cache, svc, manifest


def test_server_loads_from_settings_and_reloads_a_newly_published_version(published):
    cache, svc, first = published
    user = {"Authorization": f"Bearer {svc.user_key}"}
    admin = {"Authorization": f"Bearer {svc.admin_key}"}
    with start_server(svc.settings, port=0) as server:
        http = httpx.Client(base_url=server.url, headers=user, timeout=60)
        ready = http.get("/readyz").json()
        assert ready["ready"] and ready["index_version"] == first["version"]
        assert ready["generator"] is False
        # A user key sees the manifest without server paths; an admin key sees them.
        info = http.get("/v1/index").json()
        assert "uri" not in info["manifest"]["table"] and str(tmp_root(cache)) not in str(info)
        admin_info = http.get("/v1/index", headers=admin).json()
        assert admin_info["manifest"]["table"]["uri"]

        table = CacheTable.open(cache.store)
        query = table.vectors([row_id("sample-000077")])[0].tolist()
        hits = http.post("/v1/search", json={"inputs": [{"embedding": query}], "k": 3}).json()
        assert hits["results"][0]["key"] == "sample-000077"
        assert hits["index_version"] == first["version"]
        # Generation needs an LLM, which these settings do not configure.
        r = http.post("/v1/generate", json={"prompt": "hi", "stream": False})
        assert r.status_code == 503 and r.json()["error"] == "no_llm"

        # The embedding job appends rows: the served index stays on its own table version.
        append_rows(cache, 40, seed=3)
        new_key = "sample-000210"
        new_query = CacheTable.open(cache.store).vectors([row_id(new_key)])[0].tolist()
        before = http.post("/v1/search", json={"inputs": [{"embedding": new_query}], "k": 1})
        assert before.json()["results"][0]["key"] != new_key
        assert http.get("/v1/index").json()["rows"] == 200

        second = indexing.build(
            CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
        )
        assert second["version"] != first["version"]
        r = http.post("/v1/admin/reload", headers=admin)
        assert r.json() == {
            "reloaded": True, "version": second["version"], "detail": "", "extra_versions": {}
        }  # fmt: skip
        after = http.post("/v1/search", json={"inputs": [{"embedding": new_query}], "k": 1})
        assert after.json()["results"][0]["key"] == new_key
        info = http.get("/v1/index").json()
        assert info["version"] == second["version"] and info["rows"] == 240
        assert info["manifest"]["version"] == second["version"]
        http.close()


def test_server_without_a_published_index_is_alive_but_not_ready(tmp_path):
    cache = build_demo_cache(tmp_path, rows=20, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0.2)
    svc.settings.index.use_gpu = "no"
    with start_server(svc.settings, port=0) as server:
        http = httpx.Client(base_url=server.url, headers={"X-API-Key": svc.user_key})
        assert http.get("/healthz").status_code == 200
        r = http.get("/readyz")
        assert r.status_code == 503 and r.json()["encoder"] is True
        r = http.post("/v1/search", json={"inputs": [{"modality": "text", "text": "a dog"}]})
        assert r.status_code == 503 and "no index has been published" in r.json()["detail"]
        # Embedding needs no index.
        r = http.post("/v1/embed", json={"inputs": [{"modality": "text", "text": "a dog"}]})
        assert r.status_code == 200
        # Publishing one makes the server ready without a restart (the poll loop).
        manifest = indexing.build(
            CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
        )
        for _ in range(100):
            if http.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert http.get("/readyz").json()["index_version"] == manifest["version"]
        http.close()


# --------------------------------------------------------------------------- the table's encoder


def encoder_of(preset: str, weights_dir) -> dict:
    """The identity the embedding job records for ``preset`` (as ``configured_encoder`` gives)."""
    return configured_encoder(EncoderConfig(preset=preset), WeightsConfig(dir=weights_dir))


def published_with(tmp_path, preset: str, **serve):
    """A demo cache recorded as embedded by ``preset``, its index published, and settings that
    configure the tiny encoder."""
    cache = build_demo_cache(tmp_path, rows=60, dim=64, encoder=encoder_of(preset, tmp_path))
    svc = service_settings(tmp_path, cache, index_poll_s=0, **serve)
    svc.settings.index.use_gpu = "no"
    indexing.build(
        CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
    )
    return cache, svc


def test_a_table_embedded_with_another_preset_is_refused_naming_both_encoders(tmp_path):
    _, svc = published_with(tmp_path, "small")
    with pytest.raises(EncoderMismatchError) as refused:
        start_server(svc.settings, port=0)
    message = str(refused.value)
    assert "preset 'small'" in message and "preset 'tiny'" in message
    assert "--preset small" in message and "--allow-encoder-mismatch" in message
    # Without waiting: alive, not ready, and /readyz tells a key holder why.
    with start_server(svc.settings, port=0, wait_ready=False) as server:
        http = httpx.Client(base_url=server.url, headers={"X-API-Key": svc.user_key})
        for _ in range(600):
            ready = http.get("/readyz")
            if "error" in ready.json() and ready.json()["error"]:
                break
            time.sleep(0.1)
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert "EncoderMismatchError" in ready.json()["error"]
        assert "preset 'small'" in ready.json()["error"]
        assert http.get("/healthz").status_code == 200
        r = http.post("/v1/search", json={"inputs": [{"modality": "text", "text": "a dog"}]})
        assert r.status_code == 503
        http.close()


def test_the_override_serves_another_encoders_table_and_logs_both(tmp_path, caplog):
    _, svc = published_with(tmp_path, "small")
    svc.settings.encoder.allow_mismatch = True
    with (
        caplog.at_level(logging.WARNING, logger="cachebind.store"),
        start_server(svc.settings, port=0) as server,
    ):
        http = httpx.Client(base_url=server.url, headers={"X-API-Key": svc.user_key})
        assert http.get("/readyz").json()["ready"] is True
        body = {"inputs": [{"modality": "text", "text": "a dog"}], "k": 3}
        r = http.post("/v1/search", json=body)
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        http.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "cachebind.store"]
    assert any("preset 'small'" in w and "allow_mismatch" in w for w in warnings)


def test_a_reload_to_another_encoders_table_is_refused_and_the_old_version_serves(tmp_path):
    cache, svc = published_with(tmp_path, "tiny")
    admin = {"Authorization": f"Bearer {svc.admin_key}"}
    with start_server(svc.settings, port=0) as server:
        http = httpx.Client(base_url=server.url, headers=admin, timeout=60)
        serving = http.get("/v1/index").json()["version"]
        # The table is re-embedded (overwritten) with another preset and a new index published.
        build_demo_cache(tmp_path, rows=60, dim=64, encoder=encoder_of("small", tmp_path))
        newer = indexing.build(
            CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
        )
        r = http.post("/v1/admin/reload")
        assert r.status_code == 409 and r.json()["error"] == "encoder_mismatch"
        assert "preset 'small'" in r.json()["detail"] and newer["version"] in r.json()["detail"]
        assert http.get("/v1/index").json()["version"] == serving
        body = {"inputs": [{"modality": "text", "text": "a dog"}], "k": 3}
        assert http.post("/v1/search", json=body).status_code == 200
        http.close()


def test_a_first_index_over_another_encoders_table_leaves_the_server_not_ready_saying_why(
    tmp_path,
):
    cache = build_demo_cache(tmp_path, rows=40, dim=64, encoder=encoder_of("small", tmp_path))
    svc = service_settings(tmp_path, cache, index_poll_s=0.2)
    svc.settings.index.use_gpu = "no"
    with start_server(svc.settings, port=0) as server:
        http = httpx.Client(base_url=server.url, headers={"X-API-Key": svc.user_key})
        assert http.get("/readyz").status_code == 503  # no index yet: polling for one
        indexing.build(
            CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
        )
        for _ in range(600):  # the poll loop finds it and refuses it
            ready = http.get("/readyz").json()
            if ready.get("error"):
                break
            time.sleep(0.1)
        assert ready["ready"] is False and "preset 'small'" in ready["error"]
        http.close()
