"""LLaVA-1.5's connector: patch tokens -> visual tokens in the LLM's embedding space.

The published layout (``multi_modal_projector.linear_1`` / ``linear_2`` in llava-hf checkpoints,
``mm_projector.0`` / ``mm_projector.2`` in the original ``mlp2x_gelu``): a two-layer MLP with a
GELU between, vision width -> LLM width -> LLM width, biases on both layers. Stage 1 of LLaVA-1.5
trains this module alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class LlavaProjector(nn.Module):
    """linear_2(act(linear_1(x))): [..., vision_dim] -> [..., text_dim]."""

    def __init__(
        self, vision_dim: int, text_dim: int, act: str = "gelu", bias: bool = True
    ) -> None:
        super().__init__()
        if act not in ACT2FN:
            raise ValueError(f"projector activation {act!r} is not one transformers knows")
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        # ACT2FN's names are those a llava-hf config.json writes (projector_hidden_act).
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.linear_2(self.act(self.linear_1(patch_tokens)))
        return tokens


# LLaVA's own ``mlp2x_gelu`` is ``nn.Sequential(Linear, GELU, Linear)`` under ``model.mm_projector``
# (what stage 1 writes to ``mm_projector.bin``); llava-hf names the same tensors
# ``multi_modal_projector.linear_1`` / ``linear_2``.
MM_PROJECTOR = "model.mm_projector."
_ORIGINAL_INDEX = {"linear_1": "0", "linear_2": "2"}


def to_mm_projector(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``LlavaProjector`` state (``linear_1.weight`` ...) -> ``mm_projector.bin``'s names."""
    out = {}
    for name, tensor in state.items():
        layer, _, param = name.partition(".")
        if layer not in _ORIGINAL_INDEX:
            raise ValueError(f"{name!r} is not a tensor of LLaVA's two-layer projector")
        out[f"{MM_PROJECTOR}{_ORIGINAL_INDEX[layer]}.{param}"] = tensor
    return out


def from_mm_projector(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``mm_projector.bin``'s names -> ``LlavaProjector`` state; anything else is refused."""
    back = {v: k for k, v in _ORIGINAL_INDEX.items()}
    out = {}
    for name, tensor in state.items():
        index, _, param = name.removeprefix(MM_PROJECTOR).partition(".")
        if not name.startswith(MM_PROJECTOR) or index not in back:
            raise ValueError(f"{source}: {name!r} is not a tensor of LLaVA's mlp2x_gelu projector")
        out[f"{back[index]}.{param}"] = tensor
    return out
