"""The release's loss and optimiser step (``LLaMA_adapter.forward`` with labels,
``engine_pretrain.train_one_epoch``).

loss = CrossEntropy(ignore_index=0) of the logits at positions 0..S-2 against the labels at
1..S-1 (a batch without any label gives 0 · mean(logits), so it still has a graph). Each
micro-batch's loss is divided by ``accum_iter`` and back-propagated; every ``accum_iter``
micro-batches AdamW (betas 0.9, 0.95; weight decay as ``params.weight_decay_groups``) steps.
No gradient clipping (the release's loss scaler is called with ``clip_grad=None``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cachebind.train.data import IGNORE, Batch
from cachebind.train.params import weight_decay_groups

if TYPE_CHECKING:
    from cachebind.inject.model import AdapterLlama

BETAS = (0.9, 0.95)


def caption_loss(model: AdapterLlama, batch: Batch) -> torch.Tensor:
    """The release's c_loss for ``model`` on one batch."""
    visual = model.visual_query(batch.f_m)
    logits = model(batch.tokens, visual=visual).logits
    output, labels = logits[:, :-1, :], batch.labels[:, 1:]
    if not bool((labels != IGNORE).any()):
        return output.float().mean() * 0
    return F.cross_entropy(
        output.reshape(-1, output.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE
    )


class LossModule(nn.Module):
    """``forward(batch) -> loss``: the unit DDP wraps, so that the bind network's forward runs
    inside DDP's forward too."""

    def __init__(self, model: AdapterLlama) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, f_m: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return caption_loss(self.model, Batch(f_m, tokens, labels))


def make_optimizer(
    trainable: dict[str, nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    return torch.optim.AdamW(weight_decay_groups(trainable, weight_decay), lr=lr, betas=BETAS)


class StepBatch(Protocol):
    """A micro-batch whose ``args()`` are the loss module's forward arguments."""

    def args(self) -> tuple[torch.Tensor, ...]: ...


def optimizer_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[StepBatch],
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
) -> float:
    """Accumulate the gradients of ``micro_batches`` (each loss / accum_iter) and step once.

    ``module`` is a ``LossModule``, possibly inside DistributedDataParallel: gradients are only
    all-reduced on the last micro-batch (``no_sync`` before). ``max_grad_norm`` clips the
    summed gradients' global norm before the step (transformers' Trainer, which LLaVA trains
    with; the ImageBind-LLM release does not clip). Returns the mean loss."""
    accum = len(micro_batches)
    total = 0.0
    device_type = next(module.parameters()).device.type
    for i, batch in enumerate(micro_batches):
        last = i == accum - 1
        # DistributedDataParallel's no_sync; a module outside DDP has none.
        no_sync = getattr(module, "no_sync", None)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with torch.autocast(
                device_type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                loss = module(*batch.args())
            (loss / accum).backward()
        value = float(loss.detach())
        if not math.isfinite(value):  # the release stops on a non-finite loss too
            raise FloatingPointError(f"loss is {value}, stopping training")
        total += value
    if max_grad_norm is not None:
        params = [p for p in module.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / accum
