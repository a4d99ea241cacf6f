"""The per-worker loop of a LLaVA-1.5 run from cached patch tokens (Ray Train).

The same machinery as ``loop.train_loop``: the rows of optimiser step ``s`` are those
``loop.scheduled_rows`` assigns (one worker accumulating or many DDP workers compute the same
step), the lr is set per step, every ``checkpoint_every`` steps and at the end rank 0 writes a
Ray Train checkpoint (``state.pt`` with the trainable tensors, AdamW state and step, and the
projector as ``mm_projector.bin``), and a restarted run restores it and continues with the rows
that step would have had: it ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cachebind.bind.mixed import MixedProjector, TokenSource, save_mixed_projector
from cachebind.bind.projector import to_mm_projector
from cachebind.train.loop import (
    advance,
    all_mean,
    progress_bar,
    report_checkpoint,
    restore,
    scheduled_rows,
    trim_log,
)
from cachebind.train.rows import RowSource
from cachebind.train.schedule import learning_rate, set_lr
from cachebind.train.step import optimizer_step
from cachebind.train.tokens_data import (
    IMAGE_INDEX,
    TokensBatch,
    collate_captions,
    collate_conversations,
)
from cachebind.train.tokens_model import (
    LlmSource,
    Stage,
    TokensLoss,
    load_llm,
    make_projector,
    make_tokens_optimizer,
    set_stage_trainability,
)

MM_PROJECTOR_FILE = "mm_projector.bin"  # LLaVA's stage-1 output name
MIXED_PROJECTOR_FILE = "mixed_projector.pth"


@dataclass(frozen=True)
class TokensPlan:
    """Everything a worker needs (picklable: it travels as ``train_loop_config``)."""

    stage: Stage
    llm: LlmSource
    start_file: str
    """``{"projector": LlavaProjector state}`` the run starts from (None: llava_dir's own)."""
    source: RowSource
    tokens_column: str
    patches: int
    width: int
    n_rows: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_epochs: float
    lr: float
    weight_decay: float
    max_grad_norm: float | None
    batch_size: int
    accum_iter: int
    max_length: int
    seed: int
    checkpoint_every: int
    data_cpus: float
    output_dtype: str
    log_file: str
    mix: tuple[TokenSource, ...] = ()
    """SPHINX's mixed embedding: the encoders whose columns (``mix_columns``) are concatenated."""
    mix_columns: tuple[str, ...] = ()
    mix_side: int = 0
    progress: bool = True


def build_module(plan: TokensPlan, device: torch.device, dtype: torch.dtype) -> TokensLoss:
    """The LLM and the start projector, on ``device``."""
    llm, own = load_llm(plan.llm, dtype, device)
    start = torch.load(plan.start_file, map_location="cpu", weights_only=True)["projector"]
    if start is None and own is not None:
        return TokensLoss(own, llm, IMAGE_INDEX)
    projector = make_projector(plan.llm, plan.width, plan.mix, plan.mix_side)
    projector.load_state_dict(start, strict=True)
    return TokensLoss(projector.to(device), llm, IMAGE_INDEX)


def collate(plan: TokensPlan, tok, rows: dict) -> TokensBatch:
    """Stage 1's caption rows or stage 2's conversations."""
    if "conversation" in rows:
        return collate_conversations(
            tok, rows[plan.tokens_column], rows["conversation"], rows["has_image"],
            plan.patches, plan.max_length,
        )  # fmt: skip
    if plan.mix:  # the encoders' tokens side by side, split again by the projector
        tokens = np.concatenate([np.asarray(rows[c]) for c in plan.mix_columns], axis=1)
        return collate_captions(
            tok, tokens, rows["caption"], plan.patches, plan.max_length, flat=True
        )
    return collate_captions(
        tok, rows[plan.tokens_column], rows["caption"], plan.patches, plan.max_length
    )


def projector_export(module: TokensLoss, dtype: torch.dtype):
    """``export(directory)`` writing the projector: LLaVA's as ``mm_projector.bin``, SPHINX's
    mixed one as ``mixed_projector.pth`` (``bind.mixed.save_mixed_projector``)."""

    def export(directory: Path) -> None:
        projector = module.projector
        if isinstance(projector, MixedProjector):
            save_mixed_projector(projector, directory / MIXED_PROJECTOR_FILE, dtype)
            return
        state = {k: v.detach().to("cpu", dtype) for k, v in projector.state_dict().items()}
        torch.save(to_mm_projector(state), directory / MM_PROJECTOR_FILE)

    return export


def train_tokens_loop(plan: TokensPlan) -> None:
    """``train_loop_per_worker``."""
    import ray.train
    import ray.train.torch

    from cachebind.inject.tokenizer import Tokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    torch.manual_seed(plan.seed)
    tok = Tokenizer(plan.llm.tokenizer)
    module = build_module(plan, device, torch.bfloat16 if cuda else torch.float32)
    module.train()
    trainable = set_stage_trainability(module, plan.stage)
    optimizer = make_tokens_optimizer(trainable, plan.lr, plan.weight_decay)
    start = restore(optimizer, trainable)
    log = Path(plan.log_file)
    if rank == 0:
        log.parent.mkdir(parents=True, exist_ok=True)
        trim_log(log, start)
    wrapped = ray.train.torch.prepare_model(module)
    export = projector_export(module, getattr(torch, plan.output_dtype))
    desc, shown = f"train llava-{plan.stage}", rank == 0 and plan.progress
    bar = progress_bar(plan.total_steps, start, desc, shown)
    global_batch = plan.batch_size * plan.accum_iter * world
    started = time.perf_counter()
    metrics: dict[str, float] = {"step": start}
    for step, group in scheduled_rows(plan, rank, world, start):
        epoch = step / plan.steps_per_epoch
        lr = learning_rate(
            epoch, lr=plan.lr, min_lr=0.0, warmup_epochs=plan.warmup_epochs, epochs=plan.epochs
        )
        set_lr(optimizer, lr)
        batches = [collate(plan, tok, rows).to(device) for rows in group]
        autocast = torch.bfloat16 if cuda else None
        loss = optimizer_step(wrapped, optimizer, batches, autocast, plan.max_grad_norm)
        loss = all_mean(loss, device)
        done = step + 1
        metrics = {"step": done, "epoch": round(epoch, 6), "lr": lr, "loss": loss}
        if rank == 0:
            elapsed = round(time.perf_counter() - started, 3)
            line = {**metrics, "samples": done * global_batch, "elapsed_s": elapsed}
            with log.open("a") as f:
                f.write(json.dumps(line) + "\n")
            if bar is not None:
                advance(bar, loss, lr)
        if done % plan.checkpoint_every == 0 or done == plan.total_steps:
            report_checkpoint(optimizer, trainable, done, metrics, export)
    if bar is not None:
        bar.close()
