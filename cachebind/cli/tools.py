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
        "download, locate and mix model weights",
        "Download official checkpoints (resumable, size and sha256 checked, atomic). "
        "ImageBind weights are licensed CC BY-NC 4.0 (non-commercial). `weights mix` averages "
        "two checkpoints of one architecture (SPHINX's weight mixing).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("download", "download official weights"),
        ("list", "list the known weights and whether they are here"),
        ("path", "print where a weights file is (or would be)"),
    ):
        a = actions.add_parser(action, help=text, description=text)
        if action != "list":
            a.add_argument("name", nargs="?", default="imagebind_huge")
        a.add_argument("--dir", help="weights directory (default: weights.dir)")
    mix = actions.add_parser(
        "mix",
        help="theta = beta * A + (1 - beta) * B for two checkpoints of one architecture",
        description="Mix two checkpoints (.pth / .safetensors files or checkpoint directories) "
        "of one architecture tensor by tensor: theta = beta * theta_A + (1 - beta) * theta_B. "
        "Refused, naming the tensors, when names, shapes or dtypes differ.",
    )
    mix.add_argument("a", metavar="A", help="checkpoint weighted by beta")
    mix.add_argument("b", metavar="B", help="checkpoint weighted by 1 - beta")
    mix.add_argument("--beta", type=float, required=True, help="weight of A, in [0, 1]")
    mix.add_argument(
        "--out",
        required=True,
        help="output: a .safetensors or .pth file, or a directory (model.safetensors and, "
        "when A is a directory, A's other files)",
    )


def cmd_weights(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "mix":
        from cachebind.inject.mix import mix_checkpoints

        written = mix_checkpoints(args.a, args.b, args.beta, args.out)
        print(f"saved {written} (beta {args.beta} on {args.a}, {1 - args.beta:g} on {args.b})")
        return 0

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
