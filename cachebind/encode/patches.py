"""Patch tokens of a CLIP ViT vision tower, as LLaVA-1.5 takes them.

LLaVA-1.5 feeds its projector the hidden states of the vision tower's second-to-last layer
(``vision_feature_layer = -2``), without the CLS token (``vision_feature_select_strategy =
"default"``; ``"full"`` keeps it): 576 patches of CLIP ViT-L/14 at 336 px. The tower is
frozen in both training stages, so these tokens are what a patch-token cache stores.

``hidden_states`` of transformers' ``CLIPVisionModel`` are the embeddings after
``pre_layrnorm`` followed by each encoder layer's output (no ``post_layernorm``), so index -2
is the output of the last layer but one.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import CLIPVisionModel

SelectStrategy = Literal["default", "full"]
STRATEGIES: tuple[SelectStrategy, ...] = ("default", "full")


def select_patch_tokens(
    hidden_states: tuple[torch.Tensor, ...], layer: int, strategy: SelectStrategy
) -> torch.Tensor:
    """The tokens of hidden state ``layer`` ([B, 1 + patches, C]): all of them for ``"full"``,
    the patches alone (CLS dropped) for ``"default"``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not one of {STRATEGIES}")
    if not -len(hidden_states) <= layer < len(hidden_states):
        raise ValueError(
            f"vision_feature_layer {layer} is outside the tower's {len(hidden_states)} states"
        )
    selected = hidden_states[layer]
    return selected[:, 1:] if strategy == "default" else selected


@torch.no_grad()
def clip_patch_tokens(
    tower: CLIPVisionModel,
    pixel_values: torch.Tensor,
    layer: int = -2,
    strategy: SelectStrategy = "default",
) -> torch.Tensor:
    """[B, 3, H, W] normalised pixels -> [B, patches, C] tokens of ``layer`` (frozen tower)."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
    return select_patch_tokens(out.hidden_states, layer, strategy)
