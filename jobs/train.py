"""``python -m jobs.train pretrain|finetune …``: the entry point for ``ray job submit``.

    ray job submit --address http://head:8265 --working-dir . -- \
        python -m jobs.train pretrain --config cachebind.toml --ray-address auto --num-workers 32

Settings come from the TOML file and the environment as for ``cachebind``; the flags beat both.
"""

from __future__ import annotations

import argparse
import sys

from cachebind.config import load_config
from cachebind.train.report import add_flags, print_result
from cachebind.train.trainer import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train ImageBind-LLM (stage 1 pretrain / stage 2 finetune) from the cache.",
    )
    parser.add_argument("phase", choices=["pretrain", "finetune"])
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--uri", dest="store__uri", help="LanceDB database (store.uri)")
    parser.add_argument("--table", dest="store__table", help="table name (store.table)")
    add_flags(parser)
    args = parser.parse_args(argv)
    overrides: dict[str, dict[str, object]] = {}
    for name, value in vars(args).items():
        if "__" in name and value is not None:
            section, field = name.split("__", 1)
            overrides.setdefault(section, {})[field] = value
    settings = load_config(args.config, **overrides)
    print_result(run_training(settings, args.phase))
    return 0


if __name__ == "__main__":
    sys.exit(main())
