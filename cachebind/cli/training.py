"""`cachebind train pretrain | finetune | llava-pretrain`: training from the cache on Ray Train."""

from __future__ import annotations

import argparse
from typing import Literal

from cachebind.cli.options import CommonOptions, Subcommands, command
from cachebind.config import Settings


def add_train(sub: Subcommands, common: CommonOptions) -> None:
    from cachebind.train.report import add_flags

    p = command(
        sub,
        "train",
        cmd_train,
        "train ImageBind-LLM from the cache (Ray Train)",
        "pretrain: stage 1 (bind network, prefix queries, gates) on the cache's image features "
        "and captions, without running ImageBind. finetune: stage 2 (norms, biases, LoRA). "
        "DDP on Ray Train; checkpoints every --checkpoint-every steps; re-running the same "
        "command resumes. Writes the released {'model': ...} layout that generate/serve load. "
        "llava-pretrain: LLaVA-1.5 stage 1 (the projector alone) from cached patch tokens "
        "(embed --tokens), writing LLaVA's mm_projector.bin. llava-finetune: stage 2 (projector "
        "and LLM) on --instructions, writing a llava-hf directory.",
        parents=[common.table],
    )
    p.add_argument("phase", choices=["pretrain", "finetune", "llava-pretrain", "llava-finetune"])
    add_flags(p)
    p.add_argument(
        "--llava-dir",
        dest="tokens_train__llava_dir",
        metavar="DIR",
        help="llava-hf LLaVA-1.5 directory whose LLM the projector is trained for",
    )
    p.add_argument(
        "--tokens-encoder",
        dest="tokens_train__encoder",
        metavar="NAME",
        help="cached tokens to read: clip336 (default), dinov2 ..., or imagebind",
    )
    p.add_argument(
        "--init-projector",
        dest="tokens_train__init_projector",
        metavar="FILE",
        help="start from this mm_projector.bin",
    )
    p.add_argument("--global-batch", dest="tokens_train__pretrain_batch", type=int,
                   metavar="N", help="llava-pretrain's global batch")  # fmt: skip
    p.add_argument("--lora-r", dest="tokens_train__lora_r", type=int, metavar="R",
                   help="llava-finetune with LoRA of rank R (LLaVA-1.5's finetune_lora.sh: 128); "
                   "the LLM stays frozen")  # fmt: skip


def tokens_defaults(settings: Settings) -> None:
    """``--llama-dir`` and ``--instructions`` (the [train] section's) name the base LLM and
    stage 2's data of the llava runs too, unless [tokens_train] names its own."""
    tt = settings.tokens_train
    if tt.llava_dir is None and tt.llama_dir is None:
        tt.llama_dir = settings.train.llama_dir
    if tt.instructions is None:
        tt.instructions = settings.train.instructions


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.train.report import print_result, print_tokens_result
    from cachebind.train.trainer import run_training

    if args.phase.startswith("llava-"):
        from cachebind.train.tokens_trainer import run_tokens_training

        tokens_defaults(settings)
        stage: Literal["pretrain", "finetune"] = (
            "pretrain" if args.phase == "llava-pretrain" else "finetune"
        )
        print_tokens_result(run_tokens_training(settings, stage))
        return 0
    print_result(run_training(settings, args.phase))
    return 0
