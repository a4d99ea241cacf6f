"""Memory and time of `cachebind map` on a generated table (a benchmark, not a test).

Writes ``--rows`` clustered unit vectors (fp16, as the cache stores them) to a fresh LanceDB
table under ``--dir``, then runs the map (in process, or with ``--ray`` as the Ray job) in a
child process. Reported beside the table's size on disk: the peak resident memory of the
largest single process (``ru_maxrss`` of the children) and the peak sum over the child's whole
process tree (the driver, Ray's daemons and workers; sampled every 0.5 s). The map fits its
layout on ``--sample`` rows and places the rest in partitions of ``--partition`` rows, batches
of ``--batch``, so the peak follows the sample and the batch, not the table.

    python benchmarks/bench_map.py --rows 200000 --dim 1024 --method pca --ray
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_table(path: Path, rows: int, dim: int, chunk: int = 20_000) -> None:
    import lancedb

    sys.path.insert(0, str(ROOT / "tests"))
    from tables import image_rows, synthetic_vectors

    db = lancedb.connect(str(path))
    table = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        data = image_rows(synthetic_vectors(n, dim, seed=start), start=start)
        table = db.create_table("images", data) if table is None else table
        if start:
            table.add(data)


def tree_rss_kib(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (Linux /proc), in KiB. Pages shared
    between processes (Ray's object store, libraries) count once per process: an upper bound."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while the table was read
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
        total += int(rss[0]) if rss else 0  # a zombie has no VmRSS line
    return total


def run_map(
    path: Path, method: str, sample: int, batch: int, partition: int, ray: bool, limit_s: float
) -> dict:
    runner = (
        "from jobs.map import run_map as run\n"
        if ray
        else "from cachebind.analysis.map_run import compute_map as run\n"
    )
    code = (
        "import json, sys\n" + runner + "from cachebind.config import Settings\n"
        f"s = Settings(store={{'uri': {str(path)!r}}}, analysis={{'map_sample': {sample}, "
        f"'batch_rows': {batch}, 'map_partition_rows': {partition}}})\n"
        f"print(json.dumps(run(s, {method!r}).to_dict()))\n"
    )
    started = time.perf_counter()
    # A session of its own: past the limit, the run and every Ray process it started end.
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak_tree = 0
    while child.poll() is None:
        peak_tree = max(peak_tree, tree_rss_kib(child.pid))
        if time.perf_counter() - started > limit_s:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise SystemExit(f"the map run did not finish in {limit_s:.0f} s")
        time.sleep(0.5)
    out = child.stdout.read() if child.stdout else ""
    if child.returncode:
        raise SystemExit(f"the map run failed ({child.returncode})")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        **json.loads(out.strip().splitlines()[-1]),
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_one_process_mib": round(peak_kib / 1024, 1),
        "peak_rss_process_tree_mib": round(peak_tree / 1024, 1),
        "ray": ray,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--method", choices=["umap", "pca"], default="umap")
    p.add_argument("--sample", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=65_536)
    p.add_argument("--partition", type=int, default=131_072, help="analysis.map_partition_rows")
    p.add_argument("--limit-s", type=float, default=600, help="stop the map run after this")
    p.add_argument("--ray", action="store_true", help="run the map as the Ray job (jobs/map.py)")
    p.add_argument("--dir", help="where to write the table (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "lancedb"
        make_table(path, args.rows, args.dim)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        result = run_map(
            path, args.method, args.sample, args.batch, args.partition, args.ray, args.limit_s
        )
    result.update(rows=args.rows, dim=args.dim, table_mib=round(size / 2**20, 1))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
