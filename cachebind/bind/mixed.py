"""SPHINX's mixed visual embedding: several frozen encoders' patch tokens, concatenated channel by
channel at each grid position, then projected to the LLM width.

LLaMA2-Accessory's SPHINX (``accessory/model/LLM/llama_ens*.py``) concatenates CLIP ViT-L/14,
OpenCLIP ConvNeXt-XXL and DINOv2 ViT-g/14 tokens along the channel axis and projects them with
``visual_proj = Sequential(Linear(sum of widths, dim), LayerNorm(dim))``; 32 Q-Former tokens,
projected apart (``qformer_proj``), go before them in the sequence. SPHINX needs no resampling:
it feeds each encoder the input size that makes its grid 16 x 16 (224 px for the ViTs, 512 for
the ConvNeXt). The cache's encoders have their own sizes (CLIP ViT-L/14-336: 24 x 24, DINOv2 and
ImageBind at 224 px: 16 x 16), so here each encoder's grid is resampled to one common grid first:
the tokens as a [width, h, w] map, ``F.interpolate`` bilinear (antialiased when shrinking), the
way vision transformers resample their position embeddings. The cache holds tokens without the
CLS token, and no Q-Former tokens are cached, so neither is part of this projector's input.

The input is the encoders' tokens one row after the other, ``[B, sum of patches_i · width_i]``
(each encoder's ``[patches, width]`` flattened, in ``channel_order``), the way a training batch
carries the cached columns side by side; ``split`` gives each encoder's part back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TokenSource:
    """One encoder's cached tokens: its name, patches (a square grid) and width."""

    name: str
    patches: int
    width: int

    @property
    def side(self) -> int:
        side = math.isqrt(self.patches)
        if side * side != self.patches:
            raise ValueError(f"{self.name}: {self.patches} patches are not a square grid")
        return side


def resample_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """[B, h·w, C] on a square grid -> [B, side², C] (bilinear; antialiased when shrinking)."""
    b, n, c = tokens.shape
    have = math.isqrt(n)
    if have == side:
        return tokens
    grid = tokens.transpose(1, 2).reshape(b, c, have, have)
    out = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False,
                        antialias=side < have)  # fmt: skip
    return out.reshape(b, c, side * side).transpose(1, 2)


class MixedProjector(nn.Module):
    """SPHINX's ``visual_proj`` over channel-concatenated encoders: [B, sum P_i·C_i] -> [B,
    side², text_dim]. ``channel_order`` records which channels of the concatenation are whose."""

    def __init__(self, sources: Sequence[TokenSource], text_dim: int, side: int | None = None):
        super().__init__()
        if not sources:
            raise ValueError("a mixed projector needs at least one encoder's tokens")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"encoders named twice: {names}")
        self.sources = tuple(sources)
        self.side = side if side is not None else self.sources[0].side
        for s in self.sources:
            _ = s.side  # refuses a grid that is not square
        width = sum(s.width for s in self.sources)
        self.visual_proj = nn.Sequential(nn.Linear(width, text_dim), nn.LayerNorm(text_dim))

    @property
    def channel_order(self) -> list[tuple[str, int, int]]:
        """(encoder, first channel, end channel) of the concatenated width, in order."""
        out, start = [], 0
        for s in self.sources:
            out.append((s.name, start, start + s.width))
            start += s.width
        return out

    @property
    def input_size(self) -> int:
        return sum(s.patches * s.width for s in self.sources)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """[B, input_size] -> each encoder's [B, patches, width]."""
        if flat.shape[-1] != self.input_size:
            raise ValueError(
                f"mixed tokens are {flat.shape[-1]} values a row, the encoders "
                f"{[s.name for s in self.sources]} give {self.input_size}"
            )
        sizes = [s.patches * s.width for s in self.sources]
        parts = torch.split(flat.reshape(flat.shape[0], -1), sizes, dim=1)
        return [p.reshape(-1, s.patches, s.width) for p, s in zip(parts, self.sources, strict=True)]

    def mix(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each encoder's [B, P_i, C_i] -> [B, side², sum C_i] on the common grid."""
        return torch.cat([resample_grid(p, self.side) for p in parts], dim=-1)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.visual_proj(self.mix(self.split(flat)))
        return tokens
