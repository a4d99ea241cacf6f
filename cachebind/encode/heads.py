"""Heads (trunk tokens -> one vector) and postprocessors (L2-normalise, then a logit scale)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cachebind.encode.transformer import TRUNK_LN_EPS

# The fixed logit scales of the reference postprocessors; text learns its own (init 1/0.07).
LOGIT_SCALES: dict[str, float | None] = {
    "vision": None,
    "text": 1 / 0.07,
    "audio": 20.0,
    "depth": 5.0,
    "thermal": 10.0,
    "imu": 5.0,
}
MAX_LOGIT_SCALE = 100.0


class SelectElement(nn.Module):
    """Picks one token, e.g. the CLS token at index 0."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.index]


class SelectEOSAndProject(nn.Module):
    """Text pooling as in OpenCLIP: the token at the EOT position, then ``proj``."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: Tensor, eot_index: Tensor) -> Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot_index])


def cls_head(dim: int, out_dim: int, dropout: float | None = None) -> nn.Sequential:
    """LayerNorm -> CLS token -> (Dropout for IMU) -> Linear without bias."""
    layers: list[nn.Module] = [nn.LayerNorm(dim, eps=TRUNK_LN_EPS), SelectElement(0)]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(dim, out_dim, bias=False))
    return nn.Sequential(*layers)


def text_head(dim: int, out_dim: int) -> SelectEOSAndProject:
    return SelectEOSAndProject(
        nn.Sequential(nn.LayerNorm(dim, eps=TRUNK_LN_EPS), nn.Linear(dim, out_dim, bias=False))
    )


class Normalize(nn.Module):
    """L2 normalisation over the last axis."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1, p=2)


class LogitScale(nn.Module):
    """Multiplies by ``min(exp(log_logit_scale), 100)``; a parameter when learnable, else a buffer
    (both are in the checkpoint)."""

    def __init__(self, init: float, learnable: bool) -> None:
        super().__init__()
        value = torch.full((), math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x: Tensor) -> Tensor:
        return torch.clip(self.log_logit_scale.exp(), max=MAX_LOGIT_SCALE) * x


def postprocessor(modality: str) -> nn.Module:
    """Vision: normalise only; text: normalise + learned scale; others: normalise + fixed scale."""
    scale = LOGIT_SCALES[modality]
    if scale is None:
        return Normalize()
    return nn.Sequential(Normalize(), LogitScale(scale, learnable=modality == "text"))
