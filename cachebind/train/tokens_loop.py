"""The per-worker loop of a LLaVA-1.5 run from cached patch tokens (Ray Train).

The same machinery as ``loop.train_loop``: the rows of optimiser step ``s`` are those
``loop.scheduled_rows`` assigns (one worker accumulating or many DDP workers compute the same
step), the lr is set per step, every ``checkpoint_every`` steps and at the end rank 0 writes a
Ray Train checkpoint (``state.pt`` with the trainable tensors, AdamW state and step, and the
projector as ``mm_projector.bin``), and a restarted run restores it and continues with the rows
that step would have had: it ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cachebind.bind.mixed import MixedProjector, TokenSource, save_mixed_projector
from cachebind.bind.projector import to_mm_projector
from cachebind.train.loop import Worker, restore, run_steps, scheduled_rows
from cachebind.train.lora import add_lora
from cachebind.train.rows import RowSource
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
    min_lr: float = 0.0
    """transformers' cosine schedule, which LLaVA trains with, ends at 0."""
    lora_r: int = 0
    """Stage 2 with LoRA of this rank (0: the whole LLM trains)."""
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    projector_lr_scale: float = 1.0
    """The projector's learning rate over ``lr`` (LoRA: mm_projector_lr / learning_rate)."""


def build_module(plan: TokensPlan, device: torch.device, dtype: torch.dtype) -> TokensLoss:
    """The LLM (with LoRA adapters when the plan says so) and the start projector, on
    ``device``."""
    llm, own = load_llm(plan.llm, dtype, device)
    if plan.lora_r:
        add_lora(llm.model, plan.lora_r, plan.lora_alpha, plan.lora_dropout)
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
    import ray.train.torch

    from cachebind.inject.tokenizer import Tokenizer

    worker = Worker.current(plan.seed)
    tok = Tokenizer(plan.llm.tokenizer)
    module = build_module(plan, worker.device, worker.dtype)
    module.train()
    trainable = set_stage_trainability(module, plan.stage, lora=plan.lora_r > 0)
    optimizer = make_tokens_optimizer(
        trainable, plan.lr, plan.weight_decay, projector_scale=plan.projector_lr_scale
    )
    start = restore(optimizer, trainable)
    wrapped = ray.train.torch.prepare_model(module)
    steps = (
        (step, [collate(plan, tok, rows) for rows in group])
        for step, group in scheduled_rows(plan, worker.rank, worker.world, start)
    )
    run_steps(
        worker,
        plan,
        wrapped,
        optimizer,
        trainable,
        steps,
        start,
        f"train llava-{plan.stage}",
        projector_export(module, getattr(torch, plan.output_dtype)),
    )
