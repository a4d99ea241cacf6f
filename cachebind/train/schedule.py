"""The release's learning rate (``util/lr_sched.py``, ``main_pretrain.py``).

* absolute lr = blr · effective batch / 256, effective batch = micro batch · accum_iter · workers;
* linear warmup from 0 over ``warmup_epochs``, then a half-cycle cosine down to ``min_lr``;
* set once per optimiser step at the fractional epoch ``epoch + step / steps_per_epoch``.
"""

from __future__ import annotations

import math

import torch


def absolute_lr(blr: float, effective_batch: int) -> float:
    return blr * effective_batch / 256


def learning_rate(
    epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float
) -> float:
    """lr at the fractional ``epoch``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:  # no cosine phase at all
        return lr
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
