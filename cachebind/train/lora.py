"""LoRA for LLaVA-1.5's stage 2 (``scripts/v1_5/finetune_lora.sh``): the LLM frozen, a low-rank
update ``W + (alpha / r) · B A`` learnt in every linear layer of it, the projector trained
beside at its own learning rate.

LLaVA wraps the model with peft's ``LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05,
bias="none")`` on every ``nn.Linear`` of the LLM but ``lm_head`` (``find_all_linear_names``:
q/k/v/o and gate/up/down in LLaMA), and trains the projector at ``mm_projector_lr`` 2e-5 while
LoRA takes 2e-4. As in peft, ``A`` starts Kaiming-uniform (a = sqrt(5), ``nn.Linear``'s own
init) and ``B`` at zero, so the wrapped model starts equal to the base model; dropout acts on
the adapter's input only. ``merge_lora`` folds each update into its weight, which is what
LLaVA's ``merge_lora_weights.py`` publishes: a plain model of the base's layout.

Only the adapters and the projector are trainable, so a 7B LLM stays in bfloat16 on the GPU
without gradients or optimiser moments: the memory that full stage 2 lacks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""LLaMA's linear layers, all of them but ``lm_head`` (LLaVA's ``find_all_linear_names``)."""


class LoraLinear(nn.Module):
    """``base(x) + scale · B(A(dropout(x)))`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank {r} is not a positive integer")
        self.base = base
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        weight = base.weight
        # The adapters train in float32 whatever the frozen base is (bfloat16 on GPUs).
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + (self.scale * update).to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in, in the base's dtype."""
        delta = self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())
        return (self.base.weight.detach().float() + delta).to(self.base.weight.dtype)


def add_lora(
    model: nn.Module, r: int, alpha: float, dropout: float, targets: tuple[str, ...] = LORA_TARGETS
) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` named one of ``targets`` in place; returns the
    wrapped modules' names. The caller freezes the base (``requires_grad``)."""
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                adapted = LoraLinear(child, r, alpha, dropout).train(child.training)
                setattr(module, child_name, adapted)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named one of {targets} to adapt")
    return wrapped


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each ``LoraLinear`` of ``model`` by its base with the update folded in; the
    state-dict names are the base model's again."""
    for name, module in list(lora_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = module.base
        with torch.no_grad():
            base.weight.copy_(module.merged_weight())
        setattr(parent, child, base)
    return model


def merge_lora_state(
    base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """``base`` tensors with each adapted weight ``W + scale · B A``: ``adapters`` holds
    ``<module>.lora_A`` / ``<module>.lora_B`` for the base's ``<module>.weight`` (a
    checkpoint's adapters merged into the published base weights without building a model)."""
    out = dict(base)
    modules = sorted({k.rsplit(".", 1)[0] for k in adapters if k.endswith((".lora_A", ".lora_B"))})
    for module in modules:
        key = f"{module}.weight"
        if key not in out:
            raise KeyError(f"adapter {module} has no base weight {key}")
        a, b = adapters[f"{module}.lora_A"].float(), adapters[f"{module}.lora_B"].float()
        out[key] = (out[key].float() + scale * (b @ a)).to(out[key].dtype)
    return out
