"""The service's query log and its honest recall reporting, on real servers.

The log keeps each answered input's embedding F_i per modality (bounded, on disk beside the
index, across restarts, never the input itself); ``/v1/index`` reports recall and latency per
query set; a search or enhance response says which set's recall applies to its query; and a
``cachebind index tune`` (the CLI, in its own process) on the logged traffic reaches a running
server without a failed request.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from builders import TableFlatLoader, build_demo_cache, service_settings, tiny_runtime
from PIL import Image

import indexing
from cachebind.config import load_config
from cachebind.published.manifest import Manifest
from cachebind.published.querylog import query_log_path, read_log_file
from cachebind.serve import start_server
from cachebind.serve.runtime import IndexSnapshot
from cachebind.store import CacheTable

DIM = 64
ROOT = Path(__file__).resolve().parents[1]


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (96, 72)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def image_input(data: bytes, weight: float = 1.0) -> dict[str, Any]:
    return {"modality": "image", "data": base64.b64encode(data).decode(), "weight": weight}


def text_input(text: str, weight: float = 1.0) -> dict[str, Any]:
    return {"modality": "text", "text": text, "weight": weight}


class Service:
    """A real server on 127.0.0.1 over a demo cache, and a client with a user key."""

    def __init__(self, root: Path, cache: Any, loader: Any = None, **serve: Any) -> None:
        self.svc = service_settings(root, cache, index_poll_s=0, **serve)
        loader = loader or TableFlatLoader(cache.store)
        self.runtime = tiny_runtime(self.svc.settings, loader)
        self.server = start_server(self.svc.settings, self.runtime, port=0)
        self.http = httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.svc.user_key}"},
            timeout=60,
        )
        self.log_path = query_log_path(self.svc.settings.index.dir)

    def first_row(self) -> np.ndarray:
        """The cached vector of the table's first row (an image embedding)."""
        table = self.runtime.snapshot.table
        return table.vectors(table.ids()[:1].tolist())[0]

    def search(self, *inputs: dict[str, Any], k: int = 3) -> dict[str, Any]:
        r = self.http.post("/v1/search", json={"inputs": list(inputs), "k": k})
        assert r.status_code == 200, r.text
        return r.json()

    def enhance(self, *inputs: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/v1/enhance", json={"inputs": list(inputs), "k": 3})
        assert r.status_code == 200, r.text
        return r.json()

    def embed(self, *inputs: dict[str, Any]) -> list[np.ndarray]:
        r = self.http.post("/v1/embed", json={"inputs": list(inputs)})
        assert r.status_code == 200, r.text
        return [np.asarray(i["embedding"], np.float32) for i in r.json()["items"]]

    def index(self) -> dict[str, Any]:
        r = self.http.get("/v1/index")
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


@pytest.fixture
def cache(tmp_path):
    return build_demo_cache(tmp_path, rows=120, dim=DIM)


# ------------------------------------------------------------------ the log


def test_the_log_keeps_each_modality_bounded_and_survives_a_restart(tmp_path, cache):
    # A long flush interval: only the shutdown writes the file.
    options = {"capacity_per_modality": 5, "flush_interval_s": 3600}
    first = Service(tmp_path, cache, query_log=options)
    try:
        for i in range(8):
            first.search(text_input(f"a photo of thing number {i}"))
        for i in range(3):
            first.enhance(image_input(png_bytes((30 * i, 90, 200))))
        row = first.first_row()
        # A raw embedding counts only when the client says what it embeds.
        first.search({"embedding": row.tolist()})
        first.search({"embedding": row.tolist(), "modality": "image"})
        assert first.index()["query_log"] == {
            "enabled": True,
            "capacity_per_modality": 5,
            "modalities": {
                "text": {"seen": 8, "kept": 5, "dim": DIM},
                "image": {"seen": 4, "kept": 4, "dim": DIM},
            },
        }
        assert not first.log_path.exists()
    finally:
        first.stop()

    state, arrays = read_log_file(first.log_path)
    assert {m: a.shape for m, a in arrays.items()} == {"text": (5, DIM), "image": (4, DIM)}
    assert state["modalities"]["text"]["seen"] == 8

    second = Service(tmp_path, cache, query_log=options)
    try:
        assert second.index()["query_log"]["modalities"]["text"] == {
            "seen": 8,
            "kept": 5,
            "dim": DIM,
        }
        second.search(text_input("one more after the restart"))
        second.search(text_input("and another"))
    finally:
        second.stop()
    state, arrays = read_log_file(second.log_path)
    assert state["modalities"]["text"]["seen"] == 10 and arrays["text"].shape == (5, DIM)
    assert state["modalities"]["image"]["seen"] == 4


def test_the_log_holds_each_inputs_embedding_and_nothing_of_the_input(tmp_path, cache):
    secret = "zanzibar-quokka-7731 sails at midnight"
    picture = png_bytes((201, 17, 99), size=(80, 64))
    service = Service(tmp_path, cache, query_log={"flush_interval_s": 3600})
    try:
        # A weighted mix is logged as its parts, each under its own modality.
        service.search(text_input(secret, 2.0), image_input(picture, 0.5))
        service.enhance(text_input(secret))
        text_f, image_f = service.embed(text_input(secret), image_input(picture))
    finally:
        service.stop()

    blob = service.log_path.read_bytes()
    assert secret.encode() not in blob and secret.encode("utf-16-le") not in blob
    for start in range(0, len(picture) - 32, 32):  # not even a 32-byte piece of the file
        assert picture[start : start + 32] not in blob
    with zipfile.ZipFile(service.log_path) as z:
        assert sorted(z.namelist()) == ["image.npy", "state.npy", "text.npy"]
    state, arrays = read_log_file(service.log_path)
    assert set(state) == {"format", "capacity_per_modality", "modalities"}
    assert all(a.dtype == np.float32 and a.shape[1] == DIM for a in arrays.values())
    # The rows are the encoder's embeddings of what was sent, unit norm: not the blend.
    np.testing.assert_allclose(arrays["text"], np.stack([text_f, text_f]), atol=1e-5)
    np.testing.assert_allclose(arrays["image"], image_f[None, :], atol=1e-5)


def test_the_log_is_written_periodically_while_serving(tmp_path, cache):
    service = Service(tmp_path, cache, query_log={"flush_interval_s": 0.2})
    try:
        service.search(text_input("a periodic query"))
        deadline = time.monotonic() + 10
        while not service.log_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        _, arrays = read_log_file(service.log_path)
        assert arrays["text"].shape == (1, DIM)
    finally:
        service.stop()


def test_raw_embeddings_can_be_kept_out_of_the_log(tmp_path, cache):
    service = Service(tmp_path, cache, query_log={"raw_embeddings": False})
    try:
        row = service.first_row()
        service.search({"embedding": row.tolist(), "modality": "image"})
        service.search({"embedding": row.tolist(), "modality": "text"}, text_input("a cat"))
        assert service.index()["query_log"]["modalities"] == {
            "text": {"seen": 1, "kept": 1, "dim": DIM}
        }
    finally:
        service.stop()


def test_the_log_is_off_when_disabled(tmp_path, cache):
    service = Service(tmp_path, cache, query_log={"enabled": False, "flush_interval_s": 0.1})
    try:
        service.search(text_input("not to be kept"))
        service.enhance(image_input(png_bytes((1, 2, 3))))
        time.sleep(0.3)
        assert service.index()["query_log"] == {
            "enabled": False,
            "capacity_per_modality": 5000,
            "modalities": {},
        }
    finally:
        service.stop()
    assert not service.log_path.exists()


def test_the_log_is_turned_off_or_sized_from_the_environment(monkeypatch):
    monkeypatch.setenv("CACHEBIND_SERVE__QUERY_LOG__ENABLED", "false")
    monkeypatch.setenv("CACHEBIND_SERVE__QUERY_LOG__CAPACITY_PER_MODALITY", "123")
    settings = load_config(None)
    assert settings.serve.query_log.enabled is False
    assert settings.serve.query_log.capacity_per_modality == 123


# ------------------------------------------------------------------ recall reporting


def qset(name: str, r10: float, trusted: bool = True, n: int = 1000) -> dict[str, Any]:
    return {
        "name": name,
        "modality": name.split(":")[0],
        "source": name.split(":")[1],
        "n": n,
        "trusted": trusted,
        "recall": {"1": r10 - 0.1, "10": r10, "100": min(1.0, r10 + 0.02)},
        "recall_at_target_k_lower": r10 - 0.01,
        "latency_ms": {"batch1_p50": 0.25, "batch64_per_query": 0.02},
    }


class ManifestLoader(TableFlatLoader):
    """Exact indexes over the table, each with a manifest that declares ``sets`` (what a build
    of the query sets writes), so the service's reading of them is what is under test."""

    def __init__(self, store: Any, sets: list[dict[str, Any]]) -> None:
        super().__init__(store)
        self.sets = sets

    def load(self) -> IndexSnapshot:
        snap = super().load()
        built = {**snap.manifest.to_json(), "query_sets": self.sets}
        del built["recall_by_modality"]  # read again from the sets, as a build writes it
        return dataclasses.replace(snap, manifest=Manifest.from_json(built))


SETS = [
    qset("image:held_out", 0.97),
    qset("text:captions", 0.93),
    qset("text:query_log", 0.81),
    qset("audio:query_log", 0.6, trusted=False, n=12),
]


def test_a_response_reports_the_recall_of_its_modality_and_the_worst_part_of_a_mix(tmp_path, cache):
    service = Service(tmp_path, cache, ManifestLoader(cache.store, SETS))
    try:
        row = service.first_row()
        image = service.search({"embedding": row.tolist(), "modality": "image"})["recall"]
        assert image["set"] == "image:held_out" and image["recall_at_10"] == 0.97
        assert image["verified"] and image["trusted"]

        text = service.search(text_input("a red dog"))["recall"]
        assert text["set"] == "text:query_log" and text["recall_at_10"] == 0.81

        # One blended F_M is searched: its recall is bounded by its weakest part.
        picture = image_input(png_bytes((200, 30, 30)))
        mixed = service.search(picture, text_input("a red dog", 0.2))["recall"]
        assert mixed["set"] == "text:query_log" and mixed["recall_at_10"] == 0.81
        assert set(mixed["parts"]) == {"image", "text"}
        assert mixed["parts"]["image"]["recall_at_10"] == 0.97
        assert service.enhance(picture, text_input("a red dog", 0.2))["recall"] == mixed

        audio = service.search({"embedding": row.tolist(), "modality": "audio"}, picture)
        assert audio["recall"]["set"] == "audio:query_log" and not audio["recall"]["trusted"]

        # A raw embedding of unknown kind: no set stands behind it.
        unknown = service.search({"embedding": row.tolist()})["recall"]
        assert unknown["set"] is None and unknown["recall_at_10"] is None
        assert unknown["verified"] is False
        part = service.search({"embedding": row.tolist()}, picture)["recall"]
        assert part["set"] == "image:held_out" and part["verified"] is False
    finally:
        service.stop()


def test_the_index_route_reports_recall_and_latency_per_query_set(tmp_path, cache):
    service = Service(tmp_path, cache, ManifestLoader(cache.store, SETS))
    try:
        info = service.index()
        by_name = {s["name"]: s for s in info["query_sets"]}
        assert list(by_name) == [s["name"] for s in SETS]
        assert by_name["text:query_log"] == {
            "name": "text:query_log",
            "modality": "text",
            "source": "query_log",
            "n": 1000,
            "trusted": True,
            "recall_at_1": pytest.approx(0.71),
            "recall_at_10": 0.81,
            "recall_at_100": pytest.approx(0.83),
            "latency_ms": {"batch1_p50": 0.25, "batch64_per_query": 0.02},
            "search_params": None,  # this version records no search setting (an exact index)
        }
        assert by_name["audio:query_log"]["trusted"] is False
        assert info["recall_by_modality"]["text"]["set"] == "text:query_log"
        assert info["recall_by_modality"]["audio"] == {
            "set": "audio:query_log",
            "recall_at_10": 0.6,
            "trusted": False,
            "verified": True,
        }
        schema = service.http.get("/openapi.json").json()["components"]["schemas"]
        assert "recall" in schema["SearchResponse"]["required"]
        assert "recall" in schema["EnhanceResponse"]["required"]
        assert "worst" in schema["RecallInfo"]["description"]
        assert "query_sets" in schema["IndexInfo"]["properties"]
    finally:
        service.stop()


@pytest.mark.slow
def test_a_manifest_from_before_query_sets_reports_its_held_out_image_recall(tmp_path, cache):
    class LegacyLoader(TableFlatLoader):
        def load(self) -> IndexSnapshot:
            snap = super().load()
            before_sets = ("query_sets", "recall_by_modality")
            legacy = {
                **{k: v for k, v in snap.manifest.to_json().items() if k not in before_sets},
                "recall": {"1": 0.9, "10": 0.953, "100": 0.97},
                "recall_queries": {"count": 1000, "kind": "held-out table rows, leave-one-out"},
                "latency_ms": {"batch_1": {"p50": 0.5}, "batch_64": {"p50": 6.4}},
                "target": {"recall_k": 10},
            }
            return dataclasses.replace(snap, manifest=Manifest.from_json(legacy))

    service = Service(tmp_path, cache, LegacyLoader(cache.store))
    try:
        (only,) = service.index()["query_sets"]
        assert only["name"] == "image:held_out" and only["recall_at_10"] == 0.953
        assert only["latency_ms"] == {"batch1_p50": 0.5, "batch64_per_query": 0.1}
        text = service.search(text_input("a cat"))["recall"]
        assert text["verified"] is False and text["set"] is None
    finally:
        service.stop()
    # An index measured on nothing at all (the fixture's exact index) reports no sets.
    bare = Service(tmp_path, cache)
    try:
        assert bare.index()["query_sets"] == [] and bare.index()["recall_by_modality"] == {}
    finally:
        bare.stop()


# ------------------------------------------------------------------ end to end


def run_index_tune(settings: Any) -> dict[str, Any]:
    """``cachebind index tune --json`` in its own process, as an operator would run it."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CACHEBIND_STORE__URI": settings.store.uri,
        "CACHEBIND_STORE__TABLE": settings.store.table,
        "CACHEBIND_INDEX__DIR": str(settings.index.dir),
        "CACHEBIND_INDEX__USE_GPU": settings.index.use_gpu,
        "CACHEBIND_INDEX__MIN_QUERIES_PER_SET": str(settings.index.min_queries_per_set),
    }
    done = subprocess.run(
        [sys.executable, "-m", "cachebind.cli", "index", "tune", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_a_tune_from_the_query_log_is_picked_up_by_a_running_server_under_load(tmp_path):
    cache = build_demo_cache(tmp_path, rows=300, dim=DIM)
    svc = service_settings(
        tmp_path,
        cache,
        index_poll_s=0.1,
        batch_window_ms=3,
        query_log={"flush_interval_s": 0.2},
    )
    svc.settings.index.use_gpu = "no"
    svc.settings.index.min_queries_per_set = 40
    first = indexing.build(
        CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
    )
    assert [s["name"] for s in first["query_sets"]] == ["image:held_out"]
    log_path = query_log_path(svc.settings.index.dir)
    server = start_server(svc.settings, port=0)
    headers = {"Authorization": f"Bearer {svc.user_key}"}
    http = httpx.Client(base_url=server.url, headers=headers, timeout=60)
    try:
        # Text traffic before the tune: the built version never measured a text query.
        for i in range(50):
            r = http.post("/v1/search", json={"inputs": [text_input(f"an analyst asks {i}")]})
            assert r.status_code == 200 and r.json()["recall"]["verified"] is False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if log_path.exists() and len(read_log_file(log_path)[1].get("text", [])) >= 50:
                break
            time.sleep(0.05)

        runtime = server.app.state.serve.runtime
        table = runtime.snapshot.table
        probe = table.vectors(table.ids()[:4].tolist())
        seen: list[tuple[str, str | None, dict[str, Any]]] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(worker: int) -> None:
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
                for n in range(2000):  # bounded even if the stop never comes
                    if stop.is_set():
                        return
                    if n % 2:
                        kind, query = "text", text_input(f"load {worker} {n}")
                    else:
                        kind = "image"
                        query = {"embedding": probe[n % 4].tolist(), "modality": "image"}
                    try:
                        r = c.post("/v1/search", json={"inputs": [query], "k": 5})
                        with lock:
                            if r.status_code != 200:
                                errors.append(f"{r.status_code} {r.text[:200]}")
                            else:
                                body = r.json()
                                seen.append((kind, body["index_version"], body["recall"]))
                    except httpx.HTTPError as exc:
                        with lock:
                            errors.append(repr(exc))

        threads = [threading.Thread(target=client, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        tuned = run_index_tune(svc.settings)
        assert tuned["version"] != first["version"]
        assert tuned["update"]["mode"] == "retuned"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                after = sum(1 for _, v, _ in seen if v == tuned["version"])
            if after >= 20:
                break
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)

        assert errors == []
        versions = [v for _, v, _ in seen]
        assert first["version"] in versions and tuned["version"] in versions
        # Once moved, no request goes back to the old version.
        assert first["version"] not in versions[versions.index(tuned["version"]) + 40 :]

        sets = {s["name"]: s for s in tuned["query_sets"]}
        assert sets["text:query_log"]["n"] >= 50 and sets["text:query_log"]["trusted"]
        info = http.get("/v1/index").json()
        assert info["version"] == tuned["version"]
        # The reload swapped the index, not the log: every answered query is counted.
        logged = info["query_log"]["modalities"]
        assert logged["text"]["seen"] == 50 + sum(1 for k, _, _ in seen if k == "text")
        assert logged["image"]["seen"] == sum(1 for k, _, _ in seen if k == "image")
        shown = {s["name"]: s for s in info["query_sets"]}
        assert set(shown) == set(sets)
        for name, measured in sets.items():
            assert shown[name]["n"] == measured["n"]
            assert shown[name]["recall_at_10"] == measured["recall"]["10"]
            assert shown[name]["latency_ms"]["batch1_p50"] == measured["latency_ms"]["batch1_p50"]
        # The new version stands behind text queries, with the figure of the logged set.
        r = http.post("/v1/search", json={"inputs": [text_input("after the tune")]}).json()
        assert r["recall"]["set"] == "text:query_log" and r["recall"]["verified"]
        assert r["recall"]["recall_at_10"] == sets["text:query_log"]["recall"]["10"]
    finally:
        http.close()
        server.stop()
