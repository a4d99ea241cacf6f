"""``python -m jobs.train pretrain|finetune …``: ``cachebind train`` as a Ray job entry module.

    ray job submit --address http://head:8265 --working-dir . -- \
        python -m jobs.train pretrain --config cachebind.toml --ray-address auto --num-workers 32

The same as ``python -m cachebind train …`` (the CLI parses the flags and runs the stage);
settings come from the TOML file and the environment, and the flags beat both.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cachebind.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
