"""The bind network (ImageBind-LLM eq. 1): F~_M (1024-d) -> T_I (LLaMA's width).

    x = image_bind_proj(F~_M)
    x = x + f2_j(SiLU(f1_j(n_j(x))) ⊙ f3_j(n_j(x)))      for j = 1, 2, 3

Module names follow the released ``LLaMA_adapter`` (``image_bind_proj``, ``image_bind_norm_j``,
``image_bind_f{1,2,3}_j``) so a released checkpoint's ``image_bind_*`` tensors load as they are.
Two variants exist: ``rmsnorm`` (eps 1e-6) whose block linears have no bias — the released
code's ``LLaMA_adapter.load()`` builds it (``legacy_bridge=False``) and asserts no unexpected
keys, so today's ``7B.pth`` holds it — and ``layernorm`` with biased linears, the "legacy
bridge" of the June 2023 ``7B-beta.pth`` (code up to commit 688b713). Loading detects the
variant from the keys (``detect_variant``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cachebind.errors import WeightsError

Variant = Literal["layernorm", "rmsnorm"]
N_BLOCKS = 3


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: computed in fp32, cast back, then scaled (as the released code)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class BindNetwork(nn.Module):
    """Projects ImageBind features into LLaMA's embedding space (T_I)."""

    def __init__(
        self,
        variant: Variant = "rmsnorm",
        in_dim: int = 1024,
        dim: int = 4096,
        hidden: int = 16384,
    ) -> None:
        super().__init__()
        if variant not in ("layernorm", "rmsnorm"):
            raise ValueError(f"bind variant must be 'layernorm' or 'rmsnorm', got {variant!r}")
        self.variant: Variant = variant
        self.in_dim, self.dim, self.hidden = in_dim, dim, hidden
        bias = variant == "layernorm"
        self.image_bind_proj = nn.Linear(in_dim, dim)  # biased in both variants
        for j in range(1, N_BLOCKS + 1):
            norm = nn.LayerNorm(dim) if variant == "layernorm" else RMSNorm(dim, eps=1e-6)
            self.add_module(f"image_bind_norm_{j}", norm)
            self.add_module(f"image_bind_f1_{j}", nn.Linear(dim, hidden, bias=bias))
            self.add_module(f"image_bind_f2_{j}", nn.Linear(hidden, dim, bias=bias))
            self.add_module(f"image_bind_f3_{j}", nn.Linear(dim, hidden, bias=bias))

    def forward(self, f_m: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., dim]."""
        x: torch.Tensor = self.image_bind_proj(f_m)
        for j in range(1, N_BLOCKS + 1):
            n = getattr(self, f"image_bind_norm_{j}")(x)
            gate = F.silu(getattr(self, f"image_bind_f1_{j}")(n))
            x = x + getattr(self, f"image_bind_f2_{j}")(
                gate * getattr(self, f"image_bind_f3_{j}")(n)
            )
        return x

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], variant: Variant | Literal["auto"] = "auto"
    ) -> BindNetwork:
        """Build the network that ``state`` (``image_bind_*`` keys) describes and load it.

        Dimensions come from the tensors; the variant is detected from the keys unless given.
        Raises WeightsError naming missing or unexpected keys.
        """
        detected = detect_variant(state.keys())
        if variant == "auto":
            variant = detected
        elif variant != detected:
            raise WeightsError(
                f"bind network: checkpoint holds the {detected!r} variant, configured {variant!r}"
            )
        try:
            dim, in_dim = state["image_bind_proj.weight"].shape
            hidden = state["image_bind_f1_1.weight"].shape[0]
        except KeyError as e:
            raise WeightsError(f"bind network: checkpoint lacks {e.args[0]!r}") from None
        net = cls(variant, in_dim=in_dim, dim=dim, hidden=hidden)
        expected = set(net.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise WeightsError(
                f"bind network: missing keys {missing}, unexpected keys {unexpected}"
            )
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:  # shape mismatches
            raise WeightsError(f"bind network: {e}") from None
        return net


def detect_variant(keys: Iterable[str]) -> Variant:
    """``layernorm`` when the block norms carry a bias (LayerNorm), else ``rmsnorm``."""
    keys = set(keys)
    if not any(k.startswith("image_bind_norm_1.") for k in keys):
        raise WeightsError("bind network: no image_bind_norm_1.* key, cannot tell the variant")
    return "layernorm" if "image_bind_norm_1.bias" in keys else "rmsnorm"
