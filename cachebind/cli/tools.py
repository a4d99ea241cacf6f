"""`cachebind weights`, `demo` and `config`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cachebind.cli.options import CommonOptions, Subcommands, command
from cachebind.config import Settings


def add_weights(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "weights",
        cmd_weights,
        "download and locate model weights",
        "Download official checkpoints (resumable, size and sha256 checked, atomic). "
        "ImageBind weights are licensed CC BY-NC 4.0 (non-commercial).",
    )
    p.add_argument("action", choices=["download", "list", "path"])
    p.add_argument("name", nargs="?", default="imagebind_huge")
    p.add_argument("--dir", help="weights directory (default: weights.dir)")


def cmd_weights(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.encode import KNOWN_WEIGHTS, download_weights

    dest = Path(args.dir) if args.dir else settings.weights.dir
    if args.action == "list":
        for name, info in KNOWN_WEIGHTS.items():
            state = "present" if (dest / info.filename).is_file() else "not downloaded"
            print(f"{name}: {info.url} ({info.size / 1e9:.2f} GB, {info.license}) - {state}")
        return 0
    if args.name not in KNOWN_WEIGHTS:
        raise SystemExit(f"error: unknown weights {args.name!r}; known: {sorted(KNOWN_WEIGHTS)}")
    info = KNOWN_WEIGHTS[args.name]
    if args.action == "path":
        print(dest / info.filename)
        return 0
    print(f"{args.name} weights are licensed {info.license}: non-commercial use only.")
    path = download_weights(args.name, dest_dir=dest)
    print(f"saved {path}")
    return 0


def add_demo(sub: Subcommands, common: CommonOptions) -> None:
    p = command(
        sub,
        "demo",
        cmd_demo,
        "the whole pipeline end to end on generated data",
        "Generate a sample collection, embed it with Ray into LanceDB, build and publish the "
        "index, start the service on 127.0.0.1 and run text, audio and image+audio queries, an "
        "enhancement and a generation through the API.",
    )
    p.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    # Not the encoder's --checkpoint: the demo resolves its weights file itself.
    p.add_argument("--checkpoint", help="imagebind_huge.pth (default: the weights directory)")
    p.add_argument("--images", type=int, default=240, help="generated images (default 240)")
    p.add_argument(
        "--train",
        action="store_true",
        help="train stage 1 from the cache (~1.5 min CPU), report held-out captions, serve it",
    )


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.demo.run import run_demo

    return run_demo(
        settings,
        out=Path(args.out),
        checkpoint=args.checkpoint,
        images=args.images,
        train=args.train,
    )


def add_config(sub: Subcommands, common: CommonOptions) -> None:
    command(
        sub,
        "config",
        cmd_config,
        "print the effective configuration",
        "Print the configuration after the file, the environment and defaults are merged.",
    )


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0
