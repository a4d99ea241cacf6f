"""Ray job: build (or extend) the cache's index and publish it.

    ray job submit --working-dir . -- python jobs/index.py --config cachebind.toml --shards 64
    python jobs/index.py --add          # add rows appended since the current version

Inside ``ray job submit`` Ray is already reachable (``ray.init()`` joins the cluster); run
directly, it starts a local Ray instance. The driver trains once on a sample, the rows are added
in ``--shards`` parallel tasks (IVF shards large enough are merged on disk, into the version's
memory-mapped ``index.ivfdata``: ``--merge-on-disk``, ``--shard-dir`` on a shared file system),
and the merged index is tuned, verified and published atomically.
Prints the published manifest (JSON) on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cachebind.config import load_config
from cachebind.raycluster import start_or_join_ray
from cachebind.store import CacheTable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=None, help="cachebind TOML configuration")
    p.add_argument("--index-dir", default=None, help="overrides [index] dir (a local directory)")
    p.add_argument("--table-version", type=int, default=None, help="pin the table version")
    p.add_argument(
        "--shards",
        type=int,
        default=None,
        help="parallel add tasks (default: one per cluster CPU for tables over 1M rows)",
    )
    p.add_argument("--ray-address", default=None, help="'auto', ray://host:port, or unset")
    p.add_argument("--index-key", default=None, help="force a FAISS factory key")
    p.add_argument(
        "--merge-on-disk",
        choices=["auto", "yes", "no"],
        default=None,
        help="merge IVF shards into a memory-mapped index.ivfdata (overrides [index])",
    )
    p.add_argument(
        "--shard-dir",
        type=Path,
        default=None,
        help="shared directory for the shards' files (overrides [index] shard_dir)",
    )
    p.add_argument("--add", action="store_true", help="add appended rows to the current index")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def default_shards(rows: int, ray_address: str | None) -> int:
    """One task per cluster CPU for large tables; small ones are faster in one process."""
    if rows < 1_000_000:
        return 1
    import ray

    start_or_join_ray(ray_address, log_to_driver=False)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def main(argv: list[str] | None = None) -> int:
    import indexing

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # (load_config ignores the flags left unset)
    overrides = {
        "index": {
            "dir": args.index_dir,
            "merge_on_disk": args.merge_on_disk,
            "shard_dir": args.shard_dir,
        }
    }
    settings = load_config(args.config, **overrides)
    progress = not args.no_progress
    if args.add:
        table = CacheTable.open(settings.store, version=args.table_version)
        manifest = indexing.add_rows(
            settings.index.dir,
            table,
            settings.index,
            progress,
            shards=args.shards,
            ray_address=args.ray_address,
        )
    else:
        shards = args.shards
        if shards is None:
            rows = CacheTable.open(settings.store, version=args.table_version).count()
            shards = default_shards(rows, args.ray_address)
        manifest = indexing.build_and_publish(
            settings.store,
            settings.index,
            progress=progress,
            table_version=args.table_version,
            shards=shards,
            ray_address=args.ray_address,
            index_key=args.index_key,
        )
    from indexing.retention import collect, protect_published

    if args.add:  # the versions the retention no longer needs go (tagged ones stay)
        logging.getLogger(__name__).info("%s", collect(settings).summary())
    else:
        protect_published(settings.index.dir, settings.store)
    manifest.pop("tuning_trials", None)
    json.dump(manifest, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
