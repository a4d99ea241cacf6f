"""Ray job: build (or extend) the cache's index and publish it; ``cachebind index`` as a job.

    ray job submit --working-dir . -- python jobs/index.py --config cachebind.toml --shards 64
    python jobs/index.py --add          # add rows appended since the current version

The same as ``python -m cachebind index build --json …`` (``--add``: ``index add``): the CLI
parses the flags and runs the build. Inside ``ray job submit`` Ray is already reachable; a
table of a million rows or more is added in one task per cluster CPU unless ``--shards`` says
otherwise. Prints the published manifest (JSON) on stdout.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from cachebind.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    action = "add" if "--add" in args else "build"
    rest = [a for a in args if a != "--add"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return cli_main(["index", action, "--json", *rest])


if __name__ == "__main__":
    sys.exit(main())
