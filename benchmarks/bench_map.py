"""Memory and time of `cachebind map` on a generated table (a benchmark, not a test).

Writes ``--rows`` clustered unit vectors (fp16, as the cache stores them) to a fresh LanceDB
table under ``--dir``, then runs the map in a child process whose peak resident memory
(``ru_maxrss`` of the child) is reported beside the table's size on disk: the map fits its
layout on ``--sample`` rows and transforms the rest in batches, so the peak follows the sample
and the batch, not the table.

    python benchmarks/bench_map.py --rows 200000 --dim 1024 --method umap --sample 20000
"""

from __future__ import annotations

import argparse
import json
import resource
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


def run_map(path: Path, method: str, sample: int, batch: int) -> dict:
    code = (
        "import json, sys\n"
        "from cachebind.analysis.map_run import compute_map\n"
        "from cachebind.config import Settings\n"
        f"s = Settings(store={{'uri': {str(path)!r}}}, analysis={{'map_sample': {sample}, "
        f"'batch_rows': {batch}}})\n"
        f"print(json.dumps(compute_map(s, {method!r}).to_dict()))\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        **json.loads(out.strip().splitlines()[-1]),
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(max(peak_kib, before) / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--method", choices=["umap", "pca"], default="umap")
    p.add_argument("--sample", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=65_536)
    p.add_argument("--dir", help="where to write the table (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "lancedb"
        make_table(path, args.rows, args.dim)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        result = run_map(path, args.method, args.sample, args.batch)
    result.update(rows=args.rows, dim=args.dim, table_mib=round(size / 2**20, 1))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
