"""The production path: ``start_server(settings)`` loads the encoder and the index that
``indexing`` published, and an admin reload (or the poll loop) moves to a newer version."""

from __future__ import annotations

import time

import httpx
import pytest
from builders import append_rows, build_demo_cache, service_settings

import indexing
from cachebind.serve import start_server
from cachebind.store import CacheTable, row_id


@pytest.fixture
def published(tmp_path):
    cache = build_demo_cache(tmp_path, rows=200, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0)
    svc.settings.index.use_gpu = "no"
    manifest = indexing.build_and_publish(cache.store, svc.settings.index, progress=False)
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

        second = indexing.build_and_publish(cache.store, svc.settings.index, progress=False)
        assert second["version"] != first["version"]
        r = http.post("/v1/admin/reload", headers=admin)
        assert r.json() == {"reloaded": True, "version": second["version"], "detail": ""}
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
        manifest = indexing.build_and_publish(cache.store, svc.settings.index, progress=False)
        for _ in range(100):
            if http.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert http.get("/readyz").json()["index_version"] == manifest["version"]
        http.close()
