"""`cachebind`: one subcommand per pipeline stage.

Each subcommand turns its flags into overrides of the one Settings object and hands that object
(or the section it needs) to the stage; the stage modules never see argparse. One module per
command group (``add_<group>`` builds its parser, ``cmd_<name>`` runs it); options.py holds what
they share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from cachebind.cli.analysis import add_classify, add_map, add_report
from cachebind.cli.embedding import add_embed
from cachebind.cli.indexes import add_index, add_store
from cachebind.cli.options import EPILOG, common_options, parse_input
from cachebind.cli.queries import add_queries
from cachebind.cli.service import add_keys, add_serve
from cachebind.cli.tools import add_config, add_demo, add_weights
from cachebind.cli.training import add_train
from cachebind.config import load_config

__all__ = ["build_parser", "main", "overrides_from", "parse_input"]

# In `cachebind --help` order.
SUBCOMMANDS = (
    add_embed,
    add_index,
    add_store,
    add_serve,
    add_keys,
    add_queries,
    add_train,
    add_classify,
    add_report,
    add_map,
    add_weights,
    add_demo,
    add_config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachebind",
        description="Build and serve ImageBind feature caches.",
        epilog=EPILOG,
    )
    parser.add_argument("--config", help="TOML configuration file (or CACHEBIND_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options()
    for add in SUBCOMMANDS:
        add(sub, common)
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Flags named ``section__field`` become Settings overrides."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in vars(args).items():
        if "__" in name and value is not None:
            section, field = name.split("__", 1)
            out.setdefault(section, {})[field] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_config(args.config, **overrides_from(args))
        return args.func(settings, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's last word: a message, not a traceback
        import httpx

        from cachebind.client import CachebindAPIError
        from cachebind.errors import CachebindError

        if isinstance(exc, httpx.TransportError):
            print(f"error: cannot reach the service: {exc}", file=sys.stderr)
            return 2
        if not isinstance(exc, CachebindError | CachebindAPIError | OSError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
