"""The ImageBind trunk: a pre-norm ViT transformer with the reference parameter names.

Parameter names follow the reference ``SimpleTransformer`` / ``BlockWithMasking`` and
``torch.nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``, ``bias_k``,
``bias_v``) so that ``imagebind_huge.pth`` loads with ``strict=True``; the computation uses
``torch.nn.functional.scaled_dot_product_attention`` on batch-first tensors instead of
``nn.MultiheadAttention`` on sequence-first ones (same numbers, flash/efficient kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Every LayerNorm inside the trunks and heads uses eps 1e-6 (the stems keep torch's 1e-5).
TRUNK_LN_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample while training, identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention stored like ``nn.MultiheadAttention(bias=True, add_bias_kv)``.

    With ``add_bias_kv`` (audio, depth, thermal, IMU trunks) one learned key ``bias_k`` and value
    ``bias_v`` are appended after the input projection, exactly where ``nn.MultiheadAttention``
    appends them, so every query can also attend to that extra "null" token.
    """

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.dim = dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim, bias=True)
        self.bias_k: nn.Parameter | None
        self.bias_v: nn.Parameter | None
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's init followed by the trunk's "jax" init of out_proj.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None and self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        """``x``: ``[B, L, D]`` -> ``[B, L, D]``; ``causal`` masks future positions (text)."""
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(d, dim=-1)
        mask = None
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(b, 1, d)], dim=1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(b, 1, d)], dim=1)
            if causal:
                # nn.MultiheadAttention pads the mask with an always-visible column for bias_k.
                mask = torch.ones(n, n + 1, dtype=torch.bool, device=x.device).tril_()
                mask[:, n] = True
                causal = False
        q = q.view(b, n, h, d // h).transpose(1, 2)
        k = k.view(b, -1, h, d // h).transpose(1, 2)
        v = v.view(b, -1, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (ratio 4)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        add_bias_kv: bool = False,
        mlp_ratio: int = 4,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, add_bias_kv)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm_1 = nn.LayerNorm(dim, eps=TRUNK_LN_EPS)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.norm_2 = nn.LayerNorm(dim, eps=TRUNK_LN_EPS)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm_1(x), causal))
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class Transformer(nn.Module):
    """A modality trunk (reference ``SimpleTransformer``), batch-first ``[B, L, D]``.

    ``pre_transformer_layer.0`` is the vision trunk's LayerNorm before the first block (an
    ``nn.Identity`` elsewhere, which keeps the index of the state-dict name identical). Drop path
    grows linearly from 0 to ``drop_path_rate`` over the blocks ("progressive"), as in the
    reference; it is inactive in eval mode.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        num_heads: int,
        *,
        pre_transformer_ln: bool = False,
        add_bias_kv: bool = False,
        drop_path_rate: float = 0.0,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(
            nn.LayerNorm(dim, eps=TRUNK_LN_EPS) if pre_transformer_ln else nn.Identity()
        )
        rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, add_bias_kv, mlp_ratio, rates[i]) for i in range(num_blocks)]
        )
        self._init_linears()

    @torch.no_grad()
    def _init_linears(self) -> None:
        # The reference "jax" init: xavier-uniform Linear weights, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, causal: bool = False) -> Tensor:
        x = self.pre_transformer_layer(tokens)
        for blk in self.blocks:
            x = blk(x, causal)
        return x


def transformer_flops(dim: int, tokens: int, num_blocks: int, mlp_ratio: int = 4) -> float:
    """Forward FLOPs (2 per multiply-add) of ``num_blocks`` blocks over ``tokens`` tokens."""
    per_block = (
        2 * tokens * dim * 3 * dim  # qkv projection
        + 2 * 2 * tokens * tokens * dim  # q.k^T and attn.v
        + 2 * tokens * dim * dim  # out projection
        + 2 * 2 * tokens * dim * mlp_ratio * dim  # fc1 + fc2
    )
    return float(num_blocks * per_block)
