"""Sharded index build: the driver's memory with the in-memory merge vs the on-disk merge.

Writes ``--rows`` clustered 1024-d unit vectors into a LanceDB table (fp16, as the cache stores
them), then builds the same forced IVF key twice with ``--shards`` Ray tasks on a local Ray
instance: once merging the shards in the driver's memory (``merge_on_disk = "no"``) and once
into a memory-mapped ``index.ivfdata`` (``"yes"``). Each build runs in a fresh driver process
that samples its own memory every 20 ms; the Ray workers are other processes and not counted.

Reported per build: the driver's peak anonymous memory (RssAnon: what it really needs; the
on-disk codes are page cache, reclaimable, and shared with other readers), its peak RSS
(VmHWM: also counts mapped file and shared-memory pages touched), build time, the index's size,
and whether both builds return the same neighbours.

    python benchmarks/bench_ondisk_merge.py --rows 300000 --shards 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

DIM = 1024
ROOT = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def make_table(uri: Path, rows: int, seed: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import lancedb
    from clustered_embeddings import clustered_vectors
    from tables import image_rows

    from cachebind.store import images_schema

    table = lancedb.connect(str(uri)).create_table(
        "images", schema=images_schema(dim=DIM, thumbnail=False)
    )
    x = clustered_vectors(rows, DIM, seed=seed)  # this process is not the one measured
    step = 100_000
    for s in range(0, rows, step):
        table.add(image_rows(x[s : s + step], start=s))


def child(args: argparse.Namespace) -> None:
    """One build in this process, sampling its memory; prints a JSON line."""
    import faiss
    import ray

    import indexing
    from cachebind.config import IndexConfig, StoreConfig
    from cachebind.store import CacheTable

    peak = {"anon": status_kib("RssAnon")}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak["anon"] = max(peak["anon"], status_kib("RssAnon"))

    ray.init(num_cpus=args.shards, include_dashboard=False, log_to_driver=False)
    store = StoreConfig(uri=str(args.workdir / "db"))
    cfg = IndexConfig(
        dir=args.workdir / f"index-{args.merge}",
        use_gpu="no",
        merge_on_disk=args.merge,
        recall_target=args.recall_target,
    )
    base_anon = status_kib("RssAnon")
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    manifest = indexing.build(
        CacheTable.open(store),
        cfg,
        indexing.BuildOptions(progress=False, index_key=args.key, shards=args.shards),
    )
    build_s = time.perf_counter() - t0
    done.set()
    thread.join()
    peak["anon"] = max(peak["anon"], status_kib("RssAnon"))
    table = CacheTable.open(store)
    loaded = indexing.load_current(cfg.dir, table, use_gpu="no")
    queries = table.vectors(table.ids()[:: max(1, table.count() // 200)].tolist())
    _, ids = loaded.search(queries, 10)
    np.save(args.workdir / f"ids-{args.merge}.npy", ids)
    storage = manifest["storage"]
    folder = cfg.dir / "versions" / manifest["version"]
    index_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("index."))
    lists = faiss.extract_index_ivf(loaded.index).invlists
    print(
        json.dumps(
            {
                "merge": args.merge,
                "storage": storage["invlists"],
                "driver_peak_anon_mib": round(peak["anon"] / 1024, 1),
                "driver_anon_before_build_mib": round(base_anon / 1024, 1),
                "driver_peak_rss_mib": round(status_kib("VmHWM") / 1024, 1),
                "build_s": round(build_s, 1),
                "index_mib": round(index_bytes / 2**20, 1),
                "loaded_invlists": type(faiss.downcast_InvertedLists(lists)).__name__,
                "recall@10": manifest["recall"].get("10"),
                "search_params": manifest["search_params"],
            }
        )
    )
    ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--key", default="IVF256,SQ8", help="an IVF key with on-disk lists")
    p.add_argument("--recall-target", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", choices=["no", "yes"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.merge = args.child
        child(args)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ondisk-"))
    try:
        t0 = time.perf_counter()
        make_table(workdir / "db", args.rows, args.seed)
        print(f"table: {args.rows} x {DIM} fp16 in {time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        for merge in ("no", "yes"):
            cmd = [sys.executable, __file__, "--child", merge, "--workdir", str(workdir)]
            cmd += ["--rows", str(args.rows), "--shards", str(args.shards), "--key", args.key]
            cmd += ["--recall-target", str(args.recall_target)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        same = np.array_equal(np.load(workdir / "ids-no.npy"), np.load(workdir / "ids-yes.npy"))
        memory, disk = results
        print(
            f"\n{args.rows} rows x {DIM}, {args.key}, {args.shards} shards: driver peak RssAnon "
            f"{memory['driver_peak_anon_mib']} MiB (in-memory merge) vs "
            f"{disk['driver_peak_anon_mib']} MiB (on-disk merge); index {memory['index_mib']} "
            f"MiB; build {memory['build_s']} s vs {disk['build_s']} s; same neighbours: {same}"
        )
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
