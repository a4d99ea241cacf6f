"""``python -m jobs.embed SOURCE …``: the entry point for ``ray job submit``."""

from __future__ import annotations

import argparse
import json
import sys

from cachebind.config import load_config
from jobs.embed.runner import run_embed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.embed",
        description="Embed a source's images with ImageBind into the cache's LanceDB table.",
    )
    parser.add_argument(
        "source",
        help="webdataset:/data/{00000..00331}.tar, a folder, a .parquet or cc3m:X.tsv?images=DIR",
    )
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--address", help="Ray cluster address (auto, ray://host:10001)")
    parser.add_argument("--limit", type=int, help="stop after this many samples")
    parser.add_argument("--uri", help="LanceDB database (overrides store.uri)")
    parser.add_argument("--table", help="table name (overrides store.table)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--flush-rows", type=int, default=1024, help="commit every N rows (default 1024)"
    )
    parser.add_argument("--views", type=int, help="augmented views per image (embed.views)")
    args = parser.parse_args(argv)
    settings = load_config(
        args.config,
        embed={"ray_address": args.address, "views": args.views},
        store={"uri": args.uri, "table": args.table},
    )
    report = run_embed(
        args.source,
        settings,
        limit=args.limit,
        progress=not args.no_progress,
        flush_rows=args.flush_rows,
    )
    print(json.dumps({"report": report.report_path, "rows_written": report.rows_written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
