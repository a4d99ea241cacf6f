"""The trainable sets of the release's ``LLaMA_adapter.get_trainable_params``, by released name.

pretrain (stage 1): ``image_bind_*`` (the bind network), ``prefix_query.*`` and the LLaMA gates.
finetune (stage 2): every ``llama.*`` tensor whose name holds ``norm``, ``bias`` or ``lora``.

The rules are applied to the *released* name of each ``AdapterLlama`` tensor, so the sets are the
release's by construction; everything else is frozen (``requires_grad`` False) and, as in
``set_default_trainability``, trainable tensors are kept in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cachebind.inject.convert import model_to_file_key

Phase = Literal["pretrain", "finetune"]


def released_name(model_key: str) -> str:
    """The name a tensor of ``AdapterLlama`` has in the release's ``LLaMA_adapter``
    (``bind.image_bind_proj.weight`` -> ``image_bind_proj.weight``, ``llm.model.layers.0.self_attn
    .gate`` -> ``llama.layers.0.attention.gate``, base tensors get the ``llama.`` prefix)."""
    name = model_to_file_key(model_key)
    if model_key.startswith("llm.") and not name.startswith("llama."):
        name = "llama." + name
    return name


def is_trainable(name: str, phase: Phase) -> bool:
    """``get_trainable_params``'s rule for the released name ``name``."""
    if phase == "finetune":
        return name.startswith("llama.") and any(s in name for s in ("norm", "bias", "lora"))
    if phase == "pretrain":
        if name.startswith("llama."):
            return "gate" in name
        # "image_bind_" and not "image_bind.": the ImageBind encoder itself is never trained.
        return name.startswith(("image_bind_", "prefix_query."))
    raise ValueError(f"unknown phase {phase!r}: pretrain or finetune")


def trainable_parameters(model: nn.Module, phase: Phase) -> dict[str, nn.Parameter]:
    """``{model name: parameter}`` of the phase's trainable set."""
    return {
        name: p for name, p in model.named_parameters() if is_trainable(released_name(name), phase)
    }


def set_trainability(model: nn.Module, phase: Phase) -> dict[str, nn.Parameter]:
    """Freeze everything, then make the phase's set trainable in fp32 (the release's
    ``set_default_trainability``). Returns the trainable set."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = trainable_parameters(model, phase)
    for p in trainable.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return trainable


def weight_decay_groups(
    trainable: dict[str, nn.Parameter], weight_decay: float
) -> list[dict[str, object]]:
    """The release's ``misc.add_weight_decay`` (after timm): no decay for 1-d tensors and
    biases, ``weight_decay`` for the rest (gates [1, H, 1, 1] and prefix_query are decayed)."""
    no_decay, decay = [], []
    for name, p in trainable.items():
        if p.ndim == 1 or released_name(name).endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def count(trainable: dict[str, nn.Parameter]) -> int:
    return sum(int(p.numel()) for p in trainable.values())


def frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen tensors (tests check that they never change)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
