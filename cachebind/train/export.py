"""The released ``{"model": state_dict}`` layout of a trained model (trainable keys only).

Tensors are renamed to the release's names and q / k rows go back from transformers' rotary
order (halves) to Meta's (interleaved pairs), the inverse of ``inject.convert``'s load path, so
``cachebind generate`` / ``serve`` load the file unchanged, as they load ``7B.pth``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cachebind.inject.convert import unpermute_rotary
from cachebind.train.params import Phase, released_name, trainable_parameters

if TYPE_CHECKING:
    from cachebind.inject.model import AdapterLlama

# Released names whose rows are q / k output channels (permuted on load, un-permuted here).
_Q_ROWS = re.compile(r"llama\.layers\.\d+\.attention\.(wq\.weight|wq\.bias|lora_wq_l2\.weight)")
_K_ROWS = re.compile(r"llama\.layers\.\d+\.attention\.(wk\.weight|wk\.bias|lora_wk_l2\.weight)")


def exported_parameters(model: nn.Module, phase: Phase) -> dict[str, nn.Parameter]:
    """What a checkpoint of ``phase`` holds: stage 1 its trainable set; stage 2 its own plus
    stage 1's (bridge, prefix_query, gates), as the released fine-tuned ``7B.pth`` does."""
    params = trainable_parameters(model, "pretrain")
    if phase == "finetune":
        params.update(trainable_parameters(model, "finetune"))
    return params


def to_released(model: AdapterLlama, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{model name: tensor}`` (values or gradients) -> ``{released name: tensor}`` on the
    CPU, q / k rows in Meta's order."""
    cfg = model.cfg
    kv_heads = cfg.n_kv_heads or cfg.n_heads
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = released_name(key)
        value = value.detach().to("cpu", copy=True)
        if _Q_ROWS.fullmatch(name):
            value = unpermute_rotary(value, cfg.n_heads)
        elif _K_ROWS.fullmatch(name):
            value = unpermute_rotary(value, kv_heads)
        out[name] = value.contiguous()
    return out


def released_state(model: AdapterLlama, phase: Phase) -> dict[str, torch.Tensor]:
    """``{released name: tensor}`` of ``exported_parameters``, on the CPU."""
    return to_released(model, dict(exported_parameters(model, phase)))


def save_released(model: AdapterLlama, phase: Phase, path: Path, dtype: torch.dtype) -> Path:
    """Write ``{"model": released_state}`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) for k, v in released_state(model, phase).items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"model": state}, tmp)
    os.replace(tmp, path)
    return path
