"""Hostile media against a live server on 127.0.0.1: every bad input is decoded in the isolated
pool, gets its own 4xx with the tag that says why, and costs nobody else anything: normal
requests sent at the same time succeed, ``/healthz`` answers within 1 s throughout, and the
memory of the server and its decode workers stays bounded. A decoder that crashes costs one
422; a request past its time budget stops its decode; a pool that cannot start is not ready.

The corpus is generated at test time (``hostile_media``, ``fixtures_media``); each scenario is
bounded to seconds.
"""

from __future__ import annotations

import base64
import contextlib
import struct
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fixtures_media as media
import hostile_media as hostile
import httpx
import numpy as np
import pytest
import serve_tasks
from builders import TableFlatLoader, build_demo_cache, service_settings, tiny_runtime
from memory import RssSampler, tree_rss

from cachebind.config import InputLimits, SandboxConfig
from cachebind.modalities import Modality
from cachebind.serve import ServerHandle, start_server

WORKERS = 2
WORKER_MEMORY_MB = 768
BOMB_POINTS = 8_000_000  # 96 MB of float32 zeros, deflated to ~100 KB
LIMITS = InputLimits(max_decompressed_bytes=64 * 1024 * 1024)
RSS_GROWTH_BOUND = 1024 * 1024 * 1024
"""What the server and its workers together may add to their idle RSS while the corpus runs
(each worker may map WORKER_MEMORY_MB more than its idle footprint; the issue's PNG bomb alone
added 1.8 GB, three at once 5.5 GB)."""


@contextlib.contextmanager
def live_server(root: Path, *, wait_ready: bool = True, **sections: Any) -> Iterator[Any]:
    """A server over a small demo cache, with ``sections`` (``sandbox=``, ``input=``,
    ``serve=``) replacing the settings' own; yields (handle, user key)."""
    cache = build_demo_cache(root, rows=40, dim=64)
    svc = service_settings(root, cache, index_poll_s=0, **sections.pop("serve", {}))
    settings = svc.settings.model_copy(update=sections)
    runtime = tiny_runtime(settings, TableFlatLoader(cache.store))
    server = start_server(settings, runtime, port=0, wait_ready=wait_ready, ready_timeout_s=120)
    try:
        yield server, svc.user_key
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, str]]:
    sandbox = SandboxConfig(
        workers=WORKERS, memory_mb=WORKER_MEMORY_MB, timeout_s=20, cpu_seconds=20, max_queue=64
    )
    with live_server(tmp_path_factory.mktemp("hostile"), sandbox=sandbox, input=LIMITS) as s:
        yield s


def client(server: ServerHandle, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def item(modality: str, data: bytes) -> dict[str, str]:
    return {"modality": modality, "data": base64.b64encode(data).decode("ascii")}


# --------------------------------------------------------------------------- the corpus


def hostile_corpus() -> dict[str, tuple[str, bytes, int, set[str]]]:
    """name -> (modality, bytes, expected status, expected tags). The multi-channel and odd-rate
    audio of the issue used to kill the server or eat gigabytes; decoded in bounded memory now,
    they succeed."""
    png = media.image_bytes(size=(320, 240))
    video = media.video_bytes(duration_s=1.0)
    wav = media.audio_bytes(duration_s=1.0)
    return {
        "wav_8_channels": ("audio", hostile.wav(8), 200, set()),
        "wav_16_channels": ("audio", hostile.wav(16), 200, set()),
        "wav_8001_hz": ("audio", hostile.wav(1, rate=8001), 200, set()),
        "flac_8_channels": ("audio", hostile.encoded_audio("flac", "flac", 8), 200, set()),
        "flac_240s_6ch_192khz": ("audio", hostile.flac_declaring(240), 422, {"too_large"}),
        "png_9000x9000_rgba": ("image", hostile.png(9000, 9000), 422, {"decompression_bomb"}),
        "png_30000x2": ("image", hostile.png(30000, 2, color_type=2), 422, {"too_large"}),
        "h264_4096x4096": ("video", hostile.h264(4096, 4096), 422, {"too_large"}),
        "pt_deflate_bomb": (
            "point",
            hostile.torch_points_bomb(BOMB_POINTS),
            422,
            {"decompression_bomb"},
        ),
        "npz_deflate_bomb": (
            "point",
            hostile.npz_points_bomb(BOMB_POINTS),
            422,
            {"decompression_bomb"},
        ),
        "npz_bomb_lying_sizes": (
            "point",
            hostile.npz_points_bomb(BOMB_POINTS, lie_sizes=True),
            422,
            {"decompression_bomb", "undecodable"},
        ),
        "npy_1tib_shape_imu": ("imu", hostile.npy_header((2**20, 2**20)), 422, {"too_large"}),
        "npy_huge_shape_point": ("point", hostile.npy_header((2**38, 3)), 422, {"too_large"}),
        "pcd_count_1e11": ("point", hostile.pcd(count_z="1e11"), 422, {"undecodable"}),
        "ply_1e11_vertices": ("point", hostile.ply_declaring(10**11), 422, {"too_large"}),
        "pt_strided_1e9_rows": ("point", hostile.strided_tensor_pt(), 422, {"too_large"}),
        "truncated_png": ("image", media.truncated(png), 422, {"truncated", "undecodable"}),
        "truncated_mp4": ("video", media.truncated(video), 422, {"undecodable", "truncated"}),
        "truncated_wav_header": ("audio", wav[:30], 422, {"undecodable", "truncated"}),
        "garbage_image": ("image", media.garbage(), 422, {"undecodable"}),
        "garbage_audio": ("audio", media.garbage(), 422, {"undecodable"}),
        "garbage_video": ("video", media.garbage(), 422, {"undecodable"}),
        "garbage_depth": ("depth", media.garbage(), 422, {"undecodable"}),
        "garbage_thermal": ("thermal", media.garbage(), 422, {"undecodable"}),
        "garbage_imu": ("imu", media.garbage(), 422, {"undecodable"}),
        "garbage_point": ("point", media.garbage(), 422, {"unsupported_format"}),
    }


def normal_inputs() -> dict[str, tuple[str, bytes | str]]:
    return {
        "text": ("text", "a red square on a grey field"),
        "image": ("image", media.image_bytes(size=(320, 240))),
        "audio": ("audio", media.audio_bytes(duration_s=2.0)),
        "video": ("video", media.video_bytes(duration_s=1.0)),
        "depth": ("depth", media.depth_png16_bytes()),
        "thermal": ("thermal", media.thermal_bytes()),
        "imu": ("imu", media.npy_bytes(media.imu_array())),
        "point": ("point", media.npy_bytes(np.random.default_rng(0).normal(size=(2048, 3)))),
    }


def search_body(modality: str, data: bytes | str, k: bool = True) -> dict[str, Any]:
    """A /v1/search body (``k=False``: a /v1/embed one) of one input."""
    one = {"modality": modality, "text": data} if isinstance(data, str) else item(modality, data)
    return {"inputs": [one], "k": 3} if k else {"inputs": [one]}


# --------------------------------------------------------------------------- observers


class HealthProbe:
    """Polls ``/healthz`` every 50 ms in a thread; records the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst_s = 0.0
        self.probes = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = http.get("/healthz").status_code
                except httpx.HTTPError as exc:
                    status = repr(exc)
                self.worst_s = max(self.worst_s, time.monotonic() - started)
                self.probes += 1
                if status != 200:
                    self.failures.append(str(status))
                self._stop.wait(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def restarts(http: httpx.Client) -> dict[str, float]:
    """``cachebind_decode_worker_restarts_total`` by reason, from ``/metrics``."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("cachebind_decode_worker_restarts_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('reason="')[1].split('"')[0]] = float(value)
    return out


def gauge(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"/metrics has no {name}")


# --------------------------------------------------------------------------- the scenarios


def test_each_hostile_input_gets_its_4xx_while_normal_requests_succeed_and_healthz_stays_fast(
    served,
) -> None:
    server, key = served
    corpus = hostile_corpus()
    normal = normal_inputs()
    hostile_jobs = [
        (f"hostile:{name}", "/v1/embed", {"inputs": [item(modality, data)]})
        for name, (modality, data, _, _) in corpus.items()
    ]
    normal_jobs = [
        (f"normal:{name}:{round_}", path, search_body(modality, data, k=path == "/v1/search"))
        for round_, path in enumerate(("/v1/search", "/v1/embed", "/v1/search"))
        for name, (modality, data) in normal.items()
    ]
    jobs = [job for pair in zip(hostile_jobs, normal_jobs, strict=False) for job in pair]
    jobs += hostile_jobs[len(normal_jobs) :] + normal_jobs[len(hostile_jobs) :]
    # Tokenised off the event loop: /healthz must not wait for it.
    long_text = ("a dog on a beach " * 60_000)[: LIMITS.max_text_bytes - 1]
    jobs.insert(1, ("normal:text_1mb", "/v1/embed", search_body("text", long_text, k=False)))

    with client(server, key) as http:
        idle_rss = tree_rss()
        started = time.monotonic()
        with HealthProbe(server.url) as health, RssSampler() as rss, ThreadPoolExecutor(8) as pool:
            answers = dict(
                zip(
                    [name for name, _, _ in jobs],
                    pool.map(lambda job: http.post(job[1], json=job[2]), jobs),
                    strict=True,
                )
            )
        elapsed = time.monotonic() - started
        after = restarts(http)
        busy = gauge(http, "cachebind_decode_workers_busy")
        queued = gauge(http, "cachebind_decode_queue_depth")

    wrong = {}
    for name, (_, _, status, tags) in corpus.items():
        r = answers[f"hostile:{name}"]
        tag = r.json().get("error") if r.status_code != 200 else None
        if r.status_code != status or (tags and tag not in tags):
            wrong[name] = (r.status_code, r.text[:200])
    for name, r in answers.items():
        if name.startswith("normal:") and r.status_code != 200:
            wrong[name] = (r.status_code, r.text[:200])
    assert not wrong, wrong
    refused = [answers[f"hostile:{n}"] for n, v in corpus.items() if v[2] == 422]
    assert all(r.json()["source"] == "inputs[0]" and r.json()["detail"] for r in refused)
    print(
        f"\n{len(jobs)} requests in {elapsed:.1f} s; /healthz worst {health.worst_s * 1000:.0f} ms"
        f" over {health.probes} probes; RSS idle {idle_rss / 2**20:.0f} MiB, peak "
        f"{rss.peak / 2**20:.0f} MiB (+{(rss.peak - idle_rss) / 2**20:.0f}); restarts {after}"
    )
    assert health.failures == [] and health.probes > 10
    # Decoding on the event loop would stall a probe for a decode's whole time; a busy machine
    # only slows every answer: no probe waits a quarter of the run (or a second).
    assert health.worst_s < max(1.0, elapsed / 4), (health.worst_s, elapsed)
    assert rss.peak - idle_rss < RSS_GROWTH_BOUND
    assert (busy, queued) == (0, 0)
    assert elapsed < 60


def test_a_decoder_that_aborts_costs_one_422_and_nothing_else(served) -> None:
    server, key = served
    decoders = server.app.state.serve.media.decoders
    real = decoders[Modality.THERMAL]
    decoders[Modality.THERMAL] = serve_tasks.abort_on_marker  # runs in the real workers
    normal = normal_inputs()
    try:
        with client(server, key) as http:
            before = restarts(http)
            bodies = [search_body(m, d) for m, d in normal.values()] * 2
            crash = {"inputs": [item("thermal", b"ABORT" + media.thermal_bytes())], "k": 3}
            with ThreadPoolExecutor(6) as pool:
                pending = [pool.submit(http.post, "/v1/search", json=b) for b in bodies[:8]]
                crashed = pool.submit(http.post, "/v1/search", json=crash)
                pending += [pool.submit(http.post, "/v1/search", json=b) for b in bodies[8:]]
                answers = [f.result(60) for f in pending]
                crash_answer = crashed.result(60)
            after = restarts(http)
            thermal_after = http.post("/v1/search", json=search_body(*normal["thermal"]))
    finally:
        decoders[Modality.THERMAL] = real

    assert crash_answer.status_code == 422, crash_answer.text
    body = crash_answer.json()
    assert body["error"] == "undecodable" and "SIGABRT" in body["detail"]
    assert [r.status_code for r in answers] == [200] * len(bodies)
    assert thermal_after.status_code == 200
    grown = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert grown == {"crashed": 1}


def test_a_request_past_its_time_budget_stops_its_decode(tmp_path: Path) -> None:
    marker = tmp_path / "late.txt"
    sandbox = SandboxConfig(workers=1, timeout_s=20)
    with live_server(tmp_path, sandbox=sandbox, serve={"request_timeout_s": 1.0}) as (server, key):
        server.app.state.serve.media.decoders[Modality.DEPTH] = serve_tasks.sleep_then_write
        with client(server, key) as http:
            started = time.monotonic()
            r = http.post("/v1/embed", json={"inputs": [item("depth", str(marker).encode())]})
            answered = time.monotonic() - started
            assert r.status_code == 504 and r.json()["error"] == "timeout"
            time.sleep(5.0)  # past the moment the decode would have written
            assert not marker.exists()
            assert restarts(http) == {"abandoned": 1}
            while gauge(http, "cachebind_decode_workers_busy") > 0:  # its successor starting
                assert time.monotonic() - started < 30
                time.sleep(0.1)
            image = search_body(*normal_inputs()["image"])
            assert http.post("/v1/search", json=image).status_code == 200
        assert answered < 5


def test_a_full_decode_queue_is_429_with_retry_after(tmp_path: Path) -> None:
    sandbox = SandboxConfig(workers=1, max_queue=0, timeout_s=20)
    with live_server(tmp_path, sandbox=sandbox) as (server, key):
        server.app.state.serve.media.decoders[Modality.DEPTH] = serve_tasks.sleep_then_write
        with client(server, key) as http, ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                http.post,
                "/v1/embed",
                json={"inputs": [item("depth", str(tmp_path / "x").encode())]},
            )
            deadline = time.monotonic() + 10
            while gauge(http, "cachebind_decode_workers_busy") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            busy = http.post("/v1/search", json=search_body(*normal_inputs()["image"]))
            text = http.post("/v1/search", json=search_body(*normal_inputs()["text"]))
            assert slow.result(30).status_code == 200
    assert busy.status_code == 429 and busy.json()["error"] == "busy"
    assert int(busy.headers["Retry-After"]) >= 1
    assert text.status_code == 200  # text is not decoded in the pool


def test_readyz_says_not_ready_while_the_decode_pool_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers are started as `sys.executable -c ...`: an interpreter that is not there is a
    # pool that cannot start (as with a full process table or a broken install).
    real = sys.executable
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    sandbox = SandboxConfig(workers=1)
    with live_server(tmp_path, sandbox=sandbox, wait_ready=False) as (server, key):
        deadline = time.monotonic() + 20
        with client(server, key) as http:
            while (body := http.get("/readyz").json())["error"] is None:
                assert time.monotonic() < deadline, body
                time.sleep(0.1)
            ready = http.get("/readyz")
            image = http.post("/v1/search", json=search_body(*normal_inputs()["image"]))
            text = http.post("/v1/search", json=search_body(*normal_inputs()["text"]))
            monkeypatch.setattr(sys, "executable", real)  # the operator fixes the install
            while http.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline + 40
                time.sleep(0.2)
    assert ready.status_code == 503
    assert ready.json()["decoder"] is False and ready.json()["encoder"] is True
    assert "decode pool cannot start" in ready.json()["error"]
    assert image.status_code == 503 and image.json()["error"] == "not_ready"
    assert text.status_code == 200


def float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A mono IEEE-float WAV (format 3) of ``samples``, whatever their magnitude."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    chunks = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(chunks)) + chunks


def test_finite_but_enormous_values_are_422_not_finite_and_cost_the_batch_nothing(
    served,
) -> None:
    # Decoders check that values are finite; 3e38 is, and overflows the encoder. The NaN
    # embedding used to be a 200 of nulls from /v1/embed, an empty 200 from /v1/search and a
    # 500 from /v1/enhance for every request in its micro-batch.
    server, key = served
    enormous = {
        "imu_3e38": item("imu", media.npy_bytes(np.full((6, 2000), 3e38, np.float32))),
        "wav_1e30": item("audio", float_wav(np.sin(np.arange(16000) / 9.0) * 1e30)),
    }
    good = {"inputs": [item("imu", media.npy_bytes(media.imu_array()))]}
    with client(server, key) as http, ThreadPoolExecutor(8) as pool:
        for route in ("/v1/embed", "/v1/search", "/v1/enhance"):
            bad = [
                pool.submit(http.post, route, json={"inputs": [one]}) for one in enormous.values()
            ]
            fine = [pool.submit(http.post, "/v1/enhance", json=good) for _ in range(6)]
            for name, answer in zip(enormous, (f.result() for f in bad), strict=True):
                assert answer.status_code == 422, (route, name, answer.text)
                assert answer.json()["error"] == "not_finite", (route, name)
            assert [f.result().status_code for f in fine] == [200] * 6
