"""What several subcommands share: query inputs, the parent parsers, the subcommand helper."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachebind.modalities import Modality

EPILOG = (
    "Configuration: --config FILE (TOML, sections as in `cachebind config`), or environment "
    "variables CACHEBIND_<SECTION>__<FIELD>, e.g. CACHEBIND_STORE__URI=/data/lancedb. "
    "Flags beat both."
)


MEDIA_SUFFIXES = {
    Modality.IMAGE: {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"},
    Modality.AUDIO: {".wav", ".flac", ".mp3", ".ogg", ".oga", ".m4a"},
    Modality.VIDEO: {".mp4", ".webm", ".mkv", ".mov", ".avi"},
    Modality.IMU: {".csv", ".npy"},
    Modality.POINT: {".ply", ".pcd", ".xyz", ".pts"},
}


def parse_input(spec: str) -> tuple[Modality, str, float]:
    """``MODALITY:VALUE[@WEIGHT]`` or a file path (modality from its suffix).

    ``text:a red circle@0.5``, ``audio:bark.wav``, ``photo.jpg@2``.
    """
    weight = 1.0
    head, sep, tail = spec.rpartition("@")
    if sep and _is_number(tail):
        spec, weight = head, float(tail)
    prefix, sep, value = spec.partition(":")
    if sep and prefix in {m.value for m in Modality}:
        return Modality(prefix), value, weight
    suffix = Path(spec).suffix.lower()
    for modality, suffixes in MEDIA_SUFFIXES.items():
        if suffix in suffixes:
            return modality, spec, weight
    raise argparse.ArgumentTypeError(
        f"cannot tell the modality of {spec!r}: write MODALITY:VALUE, e.g. text:'a dog' or "
        f"audio:bark.wav (modalities: {', '.join(m.value for m in Modality)})"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def query_items(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The API's input objects for --text/--input flags (media are read here, sent as bytes)."""
    from cachebind.client import input_item

    specs = [(Modality.TEXT, text, 1.0) for text in args.text or []]
    specs += list(args.input or [])
    if not specs:
        raise SystemExit("error: give at least one --text or --input")
    items = []
    for modality, value, weight in specs:
        if modality is Modality.TEXT:
            items.append(input_item(modality, value, weight=weight))
        else:
            path = Path(value)
            if not path.is_file():
                raise SystemExit(f"error: {modality.value} input {value!r} is not a file")
            items.append(input_item(modality, path.read_bytes(), weight=weight))
    return items


@dataclass(frozen=True)
class CommonOptions:
    """Parent parsers (argparse ``parents=``) for the options several subcommands share."""

    table: argparse.ArgumentParser  # --table-uri, --table
    encoder: argparse.ArgumentParser  # --preset, --checkpoint
    index_dir: argparse.ArgumentParser  # --index-dir
    query: argparse.ArgumentParser  # --text, --input, --url, --api-key


def _parent(title: str) -> tuple[argparse.ArgumentParser, Any]:
    parser = argparse.ArgumentParser(add_help=False)
    return parser, parser.add_argument_group(title)


def _allow_mismatch(group: Any) -> None:
    group.add_argument(
        "--allow-encoder-mismatch",
        dest="encoder__allow_mismatch",
        action="store_const",
        const=True,
        help="use a table embedded by another encoder than the configured one (logged; "
        "its scores are not comparable)",
    )


def common_options() -> CommonOptions:
    table, g = _parent("cache table")
    g.add_argument(
        "--table-uri",
        "--uri",
        dest="store__uri",
        metavar="URI",
        help="LanceDB location (path or s3://…)",
    )
    g.add_argument(
        "--table", dest="store__table", metavar="NAME", help="table name (default images)"
    )

    encoder, g = _parent("encoder")
    g.add_argument(
        "--preset", dest="encoder__preset", metavar="NAME", help="ImageBind preset (default huge)"
    )
    g.add_argument(
        "--checkpoint",
        dest="encoder__checkpoint",
        metavar="FILE",
        help="ImageBind state-dict file",
    )
    _allow_mismatch(g)

    index_dir, g = _parent("index")
    g.add_argument(
        "--index-dir",
        dest="index__dir",
        metavar="DIR",
        help="directory of the published index versions",
    )

    query, g = _parent("query")
    g.add_argument("--text", action="append", help="a text query (repeatable)")
    g.add_argument(
        "--input",
        action="append",
        type=parse_input,
        metavar="[MODALITY:]VALUE[@WEIGHT]",
        help="an input of any modality; several are mixed by weight "
        "(e.g. --input photo.jpg@1 --input audio:rain.wav@0.5)",
    )
    g.add_argument("--url", help="query a running service instead of loading the cache here")
    g.add_argument("--api-key", help="API key for --url (or CACHEBIND_API_KEY)")
    _allow_mismatch(g)
    return CommonOptions(table, encoder, index_dir, query)


Subcommands = Any  # argparse's private _SubParsersAction


def command(
    sub: Subcommands,
    name: str,
    func: Callable[..., int],
    help: str,  # noqa: A002 - argparse's own word
    description: str,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help, description=description, epilog=EPILOG, parents=list(parents)
    )
    # Also after the stage (`python -m cachebind embed SRC --config F`, as a Ray job's command
    # line reads); when absent here, the top-level --config (or None) stands.
    p.add_argument("--config", default=argparse.SUPPRESS, help="TOML configuration file")
    p.set_defaults(func=func)
    return p
