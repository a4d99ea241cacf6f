"""Serving benchmark (CPU, tiny encoder): search by text over HTTP at 1, 8 and 32 concurrent
clients, and the same search called in-process, to price the HTTP layer.

    .venv/bin/python benchmarks/bench_serve.py --rows 20000 --seconds 5

The server runs in its own process (``serve_forever`` on 127.0.0.1 over an index published by
``indexing``), so the load generator does not share its interpreter. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

QUERIES = [
    f"a {c} {s} in the {p}"
    for c in ("red", "green", "blue", "yellow", "purple")
    for s in ("dog", "cat", "boat", "tree", "house", "bird", "car", "flower")
    for p in ("morning", "rain", "city")
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: Path, rows: int) -> tuple[Any, str]:
    """A LanceDB table of ``rows`` generated rows, an index published by ``indexing``, settings."""
    import indexing
    from cachebind.store import CacheTable

    # The demo-cache builders are test code (tests/builders.py), not part of the package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from builders import build_demo_cache, service_settings

    cache = build_demo_cache(root, rows=rows, dim=64)
    svc = service_settings(root, cache, index_poll_s=0)
    svc.settings.index.use_gpu = "no"
    svc.settings.serve.port = free_port()
    manifest = indexing.build(
        CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
    )
    return svc, manifest["index_key"]


async def load(
    url: str,
    key: str,
    concurrency: int,
    seconds: float,
    k: int,
    latencies: list[float] | None = None,
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next search as soon as the last one answers."""
    latencies = [] if latencies is None else latencies
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"X-API-Key": key}, timeout=60, limits=limits
    ) as http:

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.perf_counter() < stop_at:
                body = {"inputs": [{"modality": "text", "text": QUERIES[i % len(QUERIES)]}], "k": k}
                i += concurrency
                t0 = time.perf_counter()
                r = await http.post("/v1/search", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarise(concurrency, latencies, elapsed, errors)


def summarise(concurrency: int, latencies: list[float], elapsed: float, errors: int) -> dict:
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "qps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


class InProcess:
    """The same search without HTTP: F_M = embed(text), top-k from the index, rows' metadata
    (through the same per-version row lookup the server uses)."""

    def __init__(self, settings: Any) -> None:
        from cachebind.serve.runtime import Runtime

        self.runtime = Runtime.from_settings(settings, with_generator=False)
        self.latencies: list[float] = []
        self.i = 0

    def run(self, seconds: float, k: int, record: bool = True) -> None:
        snap = self.runtime.snapshot
        columns = ["id", "key", "caption", "url", "width", "height"]
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            f_m = self.runtime.encoder.embed("text", [QUERIES[self.i % len(QUERIES)]])
            _, ids = snap.index.search(f_m, k)
            snap.table.rows(ids[0][ids[0] >= 0], columns).to_pylist()
            if record:
                self.latencies.append(time.perf_counter() - t0)
            self.i += 1

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "qps_sequential": round(len(self.latencies) / sum(self.latencies), 1),
            "p50_ms": round(percentile(self.latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(self.latencies, 99) * 1000, 2),
        }


def serve_only(settings_json: str) -> None:
    from cachebind.config import Settings
    from cachebind.serve import serve_forever

    serve_forever(Settings.model_validate_json(settings_json))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of torch in the server and the in-process baseline alike "
        "(on a small shared machine, more threads than free cores make torch spin-wait)",
    )
    parser.add_argument("--serve-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Before torch is imported (lazily, below); the server subprocess inherits it.
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    if args.serve_only:
        serve_only(Path(args.serve_only).read_text())
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        svc, index_key = prepare(root, args.rows)
        settings_file = root / "settings.json"
        settings_file.write_text(svc.settings.model_dump_json())
        url = f"http://127.0.0.1:{svc.settings.serve.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-only", str(settings_file)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    r = httpx.get(f"{url}/readyz", headers={"X-API-Key": svc.user_key})
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark server did not become ready")
                time.sleep(0.2)
            # Warm-up: first calls pay for lazy imports and allocator growth.
            local = InProcess(svc.settings)
            local.run(1.0, args.k, record=False)
            asyncio.run(load(url, svc.user_key, 4, 1.0, args.k))
            # The machine is shared: alternate short in-process and HTTP rounds at concurrency
            # 1 so that a burst of outside load weighs on both sides of the overhead ratio.
            single: list[float] = []
            single_errors = 0
            for _ in range(args.rounds):
                local.run(args.seconds / args.rounds, args.k)
                run = asyncio.run(
                    load(url, svc.user_key, 1, args.seconds / args.rounds, args.k, single)
                )
                single_errors += run["errors"]
            http_runs = [
                asyncio.run(load(url, svc.user_key, int(c), args.seconds, args.k))
                for c in args.concurrency.split(",")
                if int(c) != 1
            ]
            http_runs.insert(0, summarise(1, single, args.seconds, single_errors))
            metrics = httpx.get(f"{url}/metrics", headers={"X-API-Key": svc.user_key}).text
        finally:
            server.terminate()
            server.wait(30)

    batches = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith('cachebind_batch_size_count{batcher="encoder:text"}')
        or line.startswith('cachebind_batch_size_sum{batcher="encoder:text"}')
    }
    count = next((v for n, v in batches.items() if "_count" in n), 0.0)
    total = next((v for n, v in batches.items() if "_sum" in n), 0.0)
    single_run = http_runs[0]
    local_p50 = percentile(local.latencies, 50) * 1000
    result = {
        "benchmark": "bench_serve",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "setup": {
            "rows": args.rows,
            "dim": 64,
            "encoder": "imagebind tiny (random init), CPU fp32",
            "index": index_key,
            "k": args.k,
            "seconds_per_run": args.seconds,
            "server": "uvicorn, 1 process, auth on, batch_window_ms=5",
            "torch_threads": args.torch_threads,
        },
        "http": http_runs,
        "in_process": local.summary(),
        "http_overhead": {
            "p50_ratio_http_over_in_process": round(single_run["p50_ms"] / local_p50, 2),
            "p50_added_ms": round(single_run["p50_ms"] - local_p50, 2),
        },
        "encoder_mean_batch_size": round(total / count, 2) if count else None,
        "clip_retrieval": (
            "not run: clip-retrieval's query server encodes text with a CLIP model whose weights "
            "cannot be downloaded on this machine, and needs its own virtual environment "
            "(docs/DEPENDENCIES.md); its published anchor is ~50 ms/query, ~20 queries/s with "
            "CPU FAISS"
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
