"""Live index reloads under load, request timeouts and internal failures, on a real server."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from builders import (
    TableFlatLoader,
    append_rows,
    build_demo_cache,
    service_settings,
    tiny_runtime,
)

import indexing
from cachebind.serve import start_server
from cachebind.store import CacheTable


def test_new_index_versions_are_picked_up_under_load_without_a_failed_request(tmp_path):
    # The production path: indexes published by `indexing`, found by polling CURRENT.
    cache = build_demo_cache(tmp_path, rows=200, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0.2, batch_window_ms=3)
    svc.settings.index.use_gpu = "no"
    first = indexing.build(
        CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
    )
    server = start_server(svc.settings, port=0)
    runtime = server.app.state.serve.runtime
    probe = runtime.snapshot.table.vectors(runtime.snapshot.table.ids()[:4].tolist())
    headers = {"Authorization": f"Bearer {svc.user_key}"}
    results: list[tuple[int, str | None]] = []
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Event()  # the clients query until the last version has answered

    def client(worker: int) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            n = 0
            while not done.is_set() and n < 5_000:
                n += 1
                if n % 2:
                    query = {"modality": "text", "text": f"query {worker} {n}"}
                else:
                    query = {"embedding": probe[n % 4].tolist()}
                try:
                    r = http.post("/v1/search", json={"inputs": [query], "k": 5})
                    with lock:
                        if r.status_code != 200:
                            errors.append(f"{r.status_code} {r.text[:200]}")
                        else:
                            results.append((r.status_code, r.json()["index_version"]))
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        append_rows(cache, 50, seed=1)  # the embedding job adds rows, then a new index
        second = indexing.build(
            CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
        )
        time.sleep(0.5)
        append_rows(cache, 50, seed=2)
        third = indexing.build(
            CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
        )
        # Wait on the state, not a clock: the server has switched and a request saw it.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with lock:
                answered = {v for _, v in results}
            if runtime.snapshot.version == third["version"] and third["version"] in answered:
                break
            time.sleep(0.05)
        done.set()
        for t in threads:
            t.join()
        with httpx.Client(base_url=server.url, headers=headers) as http:
            info = http.get("/v1/index").json()
            metrics = http.get("/metrics").text
    finally:
        server.stop()

    assert errors == []
    versions = Counter(v for _, v in results)
    assert len(results) >= 50
    # Requests were answered by the first and by a later version, none failed in between.
    assert versions[first["version"]] > 0 and set(versions) - {first["version"]}
    assert set(versions) <= {first["version"], second["version"], third["version"]}
    assert info["version"] == third["version"] and info["rows"] == 300
    reloads = re.search(r'cachebind_index_reloads_total\{outcome="ok"\} (\S+)', metrics)
    assert reloads and float(reloads[1]) >= 1.0
    # Concurrent requests shared encoder calls: more items than batches.
    count = float(re.search(r'batch_size_count\{batcher="encoder:text"\} (\S+)', metrics)[1])
    total = float(re.search(r'batch_size_sum\{batcher="encoder:text"\} (\S+)', metrics)[1])
    assert total > count


def test_slow_requests_get_504(tmp_path):
    cache = build_demo_cache(tmp_path, rows=50, dim=64)
    svc = service_settings(tmp_path, cache, request_timeout_s=1e-4, index_poll_s=0)
    runtime = tiny_runtime(svc.settings, TableFlatLoader(cache.store))
    with start_server(svc.settings, runtime, port=0) as server:
        r = httpx.post(
            f"{server.url}/v1/search",
            json={"inputs": [{"modality": "text", "text": "a dog"}]},
            headers={"X-API-Key": svc.user_key},
        )
    assert r.status_code == 504
    assert r.json()["error"] == "timeout"


def test_an_internal_failure_is_a_500_json_without_traceback_and_the_server_lives_on(
    tmp_path, caplog
):
    cache = build_demo_cache(tmp_path, rows=50, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0)
    runtime = tiny_runtime(svc.settings, TableFlatLoader(cache.store))
    query = {"inputs": [{"embedding": np.ones(64).tolist()}], "k": 3}
    headers = {"X-API-Key": svc.user_key}
    with start_server(svc.settings, runtime, port=0) as server:
        assert httpx.post(f"{server.url}/v1/search", json=query, headers=headers).is_success
        # The table's files vanish under the running server (a disk failure, an operator's rm).
        shutil.rmtree(Path(cache.store.uri) / "images.lance")
        r = httpx.post(f"{server.url}/v1/search", json=query, headers=headers)
        assert r.status_code == 500
        assert r.json() == {"error": "internal_error", "detail": "the server failed; see its log"}
        assert "Traceback" not in r.text
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert any("unhandled error on POST /v1/search" in m for m in caplog.messages)


def test_auth_on_without_keys_refuses_to_start(tmp_path):
    cache = build_demo_cache(tmp_path, rows=10, dim=64)
    svc = service_settings(tmp_path, cache)
    svc.settings.serve.api_keys_file = None
    svc.settings.serve.admin_keys_file = None
    with pytest.raises(ValueError, match="no keys are configured"):
        start_server(svc.settings, tiny_runtime(svc.settings, TableFlatLoader(cache.store)))


def test_admin_reload_rereads_the_key_files(tmp_path):
    from cachebind.serve.auth import create_key, write_key_file

    cache = build_demo_cache(tmp_path, rows=10, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0)
    admin = {"X-API-Key": svc.admin_key}
    with start_server(svc.settings, tiny_runtime(svc.settings, TableFlatLoader(cache.store))) as s:
        new_key = create_key(svc.settings.serve.api_keys_file)
        assert httpx.get(f"{s.url}/v1/index", headers={"X-API-Key": new_key}).status_code == 401
        assert httpx.post(f"{s.url}/v1/admin/reload", headers=admin).status_code == 200
        assert httpx.get(f"{s.url}/v1/index", headers={"X-API-Key": new_key}).status_code == 200
        # Revoking: the old user key is dropped from the file.
        write_key_file(svc.settings.serve.api_keys_file, [new_key])
        assert httpx.post(f"{s.url}/v1/admin/reload", headers=admin).status_code == 200
        r = httpx.get(f"{s.url}/v1/index", headers={"X-API-Key": svc.user_key})
        assert r.status_code == 401
        # A broken file is refused and the keys in force stay.
        svc.settings.serve.api_keys_file.write_text("not a hash\n")
        r = httpx.post(f"{s.url}/v1/admin/reload", headers=admin)
        assert r.status_code == 409 and r.json()["error"] == "bad_key_file"
        assert httpx.get(f"{s.url}/v1/index", headers={"X-API-Key": new_key}).status_code == 200


def test_an_llm_whose_bind_network_does_not_fit_the_encoder_is_refused_at_start(tmp_path):
    from cachebind.inject.tiny import build_tiny_llm

    cache = build_demo_cache(tmp_path, rows=10, dim=64)
    svc = service_settings(tmp_path, cache)
    generator = build_tiny_llm(tmp_path / "llm", visual_dim=1024)
    with pytest.raises(ValueError, match="takes 1024-d features but the encoder gives 64-d"):
        tiny_runtime(svc.settings, TableFlatLoader(cache.store), generator)
