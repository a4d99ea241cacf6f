"""`cachebind train pretrain | finetune`: ImageBind-LLM from the cache on Ray Train."""

from __future__ import annotations

import argparse

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
        "command resumes. Writes the released {'model': ...} layout that generate/serve load.",
        parents=[common.table],
    )
    p.add_argument("phase", choices=["pretrain", "finetune"])
    add_flags(p)


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from cachebind.train.report import print_result
    from cachebind.train.trainer import run_training

    print_result(run_training(settings, args.phase))
    return 0
