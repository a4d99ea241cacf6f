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

A trained projector is one file (``save_mixed_projector``): its weights, its grid, and for each
encoder the hidden state its tokens are and the encoder's identity as the cache recorded them,
so that whoever serves it can check that fresh tokens and cached rows are the ones it learnt on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cachebind.errors import WeightsError


@dataclass(frozen=True)
class TokenSource:
    """One encoder's cached tokens: its name, patches (a square grid) and width."""

    name: str
    patches: int
    width: int
    layer: int | None = None
    """The encoder's hidden state the tokens are, as the cache records it (None: unrecorded)."""
    identity: str | None = None
    """The encoder's identity as the cache records it (its weights' sha256 among others),
    canonical JSON (None: unrecorded)."""

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


MIXED_FORMAT = 2
"""Version of ``save_mixed_projector``'s file: 2 records each encoder's layer and identity."""


def save_mixed_projector(projector: MixedProjector, path: Path, dtype: torch.dtype) -> None:
    """``projector`` as one file (weights in ``dtype``), written beside ``path`` and renamed."""
    state = {k: v.detach().to("cpu", dtype) for k, v in projector.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(
        {
            "format": MIXED_FORMAT,
            "state": state,
            "channel_order": projector.channel_order,
            "sources": [asdict(s) for s in projector.sources],
            "side": projector.side,
        },
        tmp,
    )
    os.replace(tmp, path)


def load_mixed_projector(path: Path) -> MixedProjector:
    """The projector ``save_mixed_projector`` wrote (float32, strict), refused by name when
    the file is not one or records no encoder layers."""
    try:
        saved: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        # Format 1 wrote (name, patches, width) tuples.
        sources = [
            TokenSource(**s) if isinstance(s, dict) else TokenSource(*s) for s in saved["sources"]
        ]
        state, side = saved["state"], int(saved["side"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise WeightsError(f"{path}: not a mixed projector file ({exc})") from exc
    unrecorded = [s.name for s in sources if s.layer is None]
    if unrecorded:
        raise WeightsError(
            f"{path}: records no token layer for {unrecorded} (written before format "
            f"{MIXED_FORMAT}); train it again"
        )
    text_dim = int(state["visual_proj.0.weight"].shape[0]) if "visual_proj.0.weight" in state else 0
    try:
        projector = MixedProjector(sources, text_dim, side)
        projector.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    return projector
