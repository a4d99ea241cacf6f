"""``python -m jobs.classify …``: ``cachebind classify --ray`` as a Ray job entry module.

    ray job submit --working-dir . -- python -m jobs.classify --config cachebind.toml …

The same as ``python -m cachebind classify --ray …``: the CLI parses the flags and runs the job.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cachebind.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["classify", "--ray", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
