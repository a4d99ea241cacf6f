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
