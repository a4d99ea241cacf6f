"""What ``cachebind train`` and ``jobs/train.py`` print when a run ends, and the flags they
share (kept here so that ``cli.py`` only registers the group)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the trainer imports torch: `cachebind --help` should not wait for it
    from cachebind.train.trainer import TrainResult

# (flag, Settings.train field, type, help) shared by `cachebind train` and `jobs/train.py`.
FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--llama-dir", "llama_dir", str, "base LLM directory (Meta or transformers LLaMA)"),
    ("--init-checkpoint", "init_checkpoint", str, "start from this {'model': ...} file"),
    ("--instructions", "instructions", str, "stage 2: LLaVA-style instruction JSON"),
    ("--output-dir", "output_dir", str, "checkpoints, loss log and result (train.output_dir)"),
    ("--run-name", "run_name", str, "same name + output dir: resume from the last checkpoint"),
    ("--epochs", "epochs", float, "epochs (default 3)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warmup epochs"),
    ("--max-steps", "max_steps", int, "stop after this many optimiser steps"),
    ("--batch-size", "batch_size", int, "examples per worker per micro-batch"),
    ("--accum-iter", "accum_iter", int, "micro-batches per optimiser step"),
    ("--blr", "blr", float, "base lr (lr = blr * effective batch / 256)"),
    ("--lr", "lr", float, "absolute lr (overrides --blr)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--max-words", "max_words", int, "tokens per example (default 96)"),
    ("--num-workers", "num_workers", int, "Ray Train workers (one per GPU)"),
    ("--use-gpu", "use_gpu", str, "auto, yes or no"),
    ("--checkpoint-every", "checkpoint_every", int, "optimiser steps between checkpoints"),
    ("--ray-address", "ray_address", str, "join a Ray cluster (auto, ray://host:10001)"),
    ("--seed", "seed", int, "data order and initialisation seed"),
)


def add_flags(p: argparse.ArgumentParser) -> None:
    for flag, field, kind, text in FLAGS:
        choices = ["auto", "yes", "no"] if field == "use_gpu" else None
        p.add_argument(
            flag, dest=f"train__{field}", type=kind, help=text, metavar=field.upper(),
            choices=choices,
        )  # fmt: skip
    p.add_argument(
        "--no-progress",
        dest="train__progress",
        action="store_const",
        const=False,
        help="no progress bar",
    )
    p.add_argument(
        "--no-views",
        dest="train__use_views",
        action="store_const",
        const=False,
        help="train on the centre vector only, even on a table with augmented views",
    )


def summary(result: TrainResult) -> dict[str, object]:
    return {
        "phase": result.phase,
        "output": str(result.output),
        "steps": result.steps,
        "effective_batch": result.effective_batch,
        "lr": result.lr,
        "final_loss": result.final_loss,
        "loss_log": str(result.log_file),
        "loss_plot": str(result.plot) if result.plot else None,
        "checkpoints": str(result.checkpoint_dir),
    }


def print_result(result: TrainResult) -> None:
    s = summary(result)
    print(
        f"{s['phase']}: {s['steps']} steps at effective batch {s['effective_batch']} "
        f"(lr {result.lr:.3g}), final loss {result.final_loss}"
    )
    print(f"model:       {s['output']}  (released layout; load with --adapter-checkpoint)")
    print(f"loss log:    {s['loss_log']}" + (f"  plot: {s['loss_plot']}" if s["loss_plot"] else ""))
    print(f"checkpoints: {s['checkpoints']}")
    print(json.dumps(s))


def print_tokens_result(result: TrainResult) -> None:
    """What ``train llava-pretrain`` prints: LLaVA's output, not the adapter layout."""
    s = summary(result)
    print(
        f"llava {s['phase']}: {s['steps']} steps at global batch {s['effective_batch']} "
        f"(lr {result.lr:.3g}), final loss {result.final_loss}"
    )
    kind = "llava-hf directory" if result.phase == "finetune" else "LLaVA's mm_projector.bin"
    print(f"model:       {s['output']}  ({kind}; cachebind.inject.llava_load.load_llava)")
    print(f"loss log:    {s['loss_log']}" + (f"  plot: {s['loss_plot']}" if s["loss_plot"] else ""))
    print(f"checkpoints: {s['checkpoints']}")
    print(json.dumps(s))
