"""An independent implementation of the released ImageBind-LLM math, for tests only.

Written from the semantics of OpenGVLab/LLaMA-Adapter ``imagebind_LLM/llama/llama.py`` and
``llama_adapter.py``: Meta's parameter layout and names, interleaved (complex) rotary embeddings
via ``torch.polar``, the bridge ("bind network"), one adapter token per layer
(T_I + prefix_query_i) whose W_v projection, scaled by tanh(gate), is added to every position's
per-head attention output before W_o. Grouped-query attention as Meta's LLaMA-2 ``repeat_kv``:
each of the ``n_kv_heads`` key/value heads (and adapter_v heads) serves ``n_heads / n_kv_heads``
consecutive query heads. No KV cache: every call recomputes the whole sequence,
so it also checks the cached decoding of the model under test.

``RefAdapter.state_dict()`` has exactly the released key names and shapes, so
``released_checkpoints`` writes files of the released layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RefArgs:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention (LLaMA-2 70B style); None: n_heads
    vocab_size: int = 300
    multiple_of: int = 32
    norm_eps: float = 1e-6
    w_bias: bool = True
    w_lora: bool = True
    lora_rank: int = 16
    query_layer: int | None = None  # defaults to n_layers (32 for 7B)
    bind_variant: str = "layernorm"
    bind_in_dim: int = 1024
    ffn_dim_multiplier: float | None = None

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def params_json(self) -> dict:
        params = {
            "dim": self.dim,
            "multiple_of": self.multiple_of,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "norm_eps": self.norm_eps,
            "vocab_size": -1,
        }
        if self.n_kv_heads is not None:
            params["n_kv_heads"] = self.n_kv_heads
        return params


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


def freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # complex64 [end, head_dim/2]


def rotate(x: torch.Tensor, fc: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, hd]: consecutive pairs (2i, 2i+1) are one complex number."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * fc[None, :, None, :]).flatten(3).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, S, n_kv, hd] -> [B, S, n_kv * n_rep, hd], each KV head repeated n_rep times."""
    b, s, n_kv, hd = x.shape
    return x[:, :, :, None, :].expand(b, s, n_kv, n_rep, hd).reshape(b, s, n_kv * n_rep, hd)


class RefAttention(nn.Module):
    def __init__(self, a: RefArgs) -> None:
        super().__init__()
        self.h, self.hd = a.n_heads, a.dim // a.n_heads
        self.kv = a.n_kv_heads or a.n_heads
        kv_dim = self.kv * self.hd
        self.wq = nn.Linear(a.dim, a.dim, bias=a.w_bias)
        self.wk = nn.Linear(a.dim, kv_dim, bias=False)
        self.wv = nn.Linear(a.dim, kv_dim, bias=False)
        self.wo = nn.Linear(a.dim, a.dim, bias=a.w_bias)
        self.w_lora = a.w_lora
        if a.w_lora:
            for n, out in (("wq", a.dim), ("wk", kv_dim), ("wv", kv_dim), ("wo", a.dim)):
                setattr(self, f"lora_{n}_l1", nn.Linear(a.dim, a.lora_rank, bias=False))
                setattr(self, f"lora_{n}_l2", nn.Linear(a.lora_rank, out, bias=False))
        self.gate = nn.Parameter(torch.zeros(1, a.n_heads, 1, 1))

    def _proj(self, name, x):
        out = getattr(self, name)(x)
        if self.w_lora:
            out = out + getattr(self, f"lora_{name}_l2")(getattr(self, f"lora_{name}_l1")(x))
        return out

    def forward(self, x, fc, mask, adapter):
        b, s, _ = x.shape
        q = self._proj("wq", x).view(b, s, self.h, self.hd)
        k = self._proj("wk", x).view(b, s, self.kv, self.hd)
        v = self._proj("wv", x).view(b, s, self.kv, self.hd)
        q, k = rotate(q, fc), rotate(k, fc)
        k, v = repeat_kv(k, self.h // self.kv), repeat_kv(v, self.h // self.kv)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.hd) + mask
        out = F.softmax(scores.float(), dim=-1).type_as(q) @ v  # [B, H, S, hd]
        if adapter is not None:  # adapter [B, 1, dim]: one token, base W_v (no LoRA)
            adapter_v = self.wv(adapter).view(b, 1, self.kv, self.hd)
            adapter_v = repeat_kv(adapter_v, self.h // self.kv).transpose(1, 2)
            out = out + self.gate.tanh() * adapter_v
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self._proj("wo", out)


class RefFeedForward(nn.Module):
    def __init__(self, a: RefArgs) -> None:
        super().__init__()
        hidden = a.ffn_hidden
        self.w1 = nn.Linear(a.dim, hidden, bias=a.w_bias)
        self.w2 = nn.Linear(hidden, a.dim, bias=a.w_bias)
        self.w3 = nn.Linear(a.dim, hidden, bias=a.w_bias)
        self.w_lora = a.w_lora
        if a.w_lora:
            for n, (i, o) in {
                "w1": (a.dim, hidden),
                "w2": (hidden, a.dim),
                "w3": (a.dim, hidden),
            }.items():
                setattr(self, f"lora_{n}_l1", nn.Linear(i, a.lora_rank, bias=False))
                setattr(self, f"lora_{n}_l2", nn.Linear(a.lora_rank, o, bias=False))

    def _proj(self, name, x):
        out = getattr(self, name)(x)
        if self.w_lora:
            out = out + getattr(self, f"lora_{name}_l2")(getattr(self, f"lora_{name}_l1")(x))
        return out

    def forward(self, x):
        return self._proj("w2", F.silu(self._proj("w1", x)) * self._proj("w3", x))


class RefBlock(nn.Module):
    def __init__(self, a: RefArgs) -> None:
        super().__init__()
        self.attention = RefAttention(a)
        self.feed_forward = RefFeedForward(a)
        self.attention_norm = RefRMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = RefRMSNorm(a.dim, a.norm_eps)

    def forward(self, x, fc, mask, adapter=None):
        h = x + self.attention(self.attention_norm(x), fc, mask, adapter)
        return h + self.feed_forward(self.ffn_norm(h))


class RefTransformer(nn.Module):
    def __init__(self, a: RefArgs) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(RefBlock(a) for _ in range(a.n_layers))
        self.norm = RefRMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.head_dim = a.dim // a.n_heads


class RefBridgeRMSNorm(RefRMSNorm):
    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1e-6)


class RefAdapter(nn.Module):
    """``LLaMA_adapter`` without the ImageBind encoder (its input is F~_M)."""

    def __init__(self, a: RefArgs) -> None:
        super().__init__()
        self.args = a
        legacy = a.bind_variant == "layernorm"
        norm = nn.LayerNorm if legacy else RefBridgeRMSNorm
        self.image_bind_proj = nn.Linear(a.bind_in_dim, a.dim)
        for j in (1, 2, 3):
            setattr(self, f"image_bind_norm_{j}", norm(a.dim))
            setattr(self, f"image_bind_f1_{j}", nn.Linear(a.dim, 4 * a.dim, bias=legacy))
            setattr(self, f"image_bind_f2_{j}", nn.Linear(4 * a.dim, a.dim, bias=legacy))
            setattr(self, f"image_bind_f3_{j}", nn.Linear(a.dim, 4 * a.dim, bias=legacy))
        self.llama = RefTransformer(a)
        self.query_layer = a.query_layer or a.n_layers
        self.prefix_query = nn.Embedding(self.query_layer, a.dim)

    def forward_visual(self, f_m: torch.Tensor) -> torch.Tensor:
        x = self.image_bind_proj(f_m.unsqueeze(1))  # [B, 1, dim]
        for j in (1, 2, 3):
            n = getattr(self, f"image_bind_norm_{j}")(x)
            f1, f2, f3 = (getattr(self, f"image_bind_f{i}_{j}") for i in (1, 2, 3))
            x = x + f2(F.silu(f1(n)) * f3(n))
        return x

    def forward(self, tokens: torch.Tensor, f_m: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, S, vocab] for every position; ``f_m`` None runs plain LLaMA."""
        b, s = tokens.shape
        h = self.llama.tok_embeddings(tokens)
        fc = freqs_cis(self.llama.head_dim, s)
        mask = torch.triu(torch.full((1, 1, s, s), float("-inf")), diagonal=1).type_as(h)
        n_plain = len(self.llama.layers) - self.query_layer
        visual = self.forward_visual(f_m) if f_m is not None else None
        for i, layer in enumerate(self.llama.layers):
            adapter = None
            if visual is not None and i >= n_plain:
                adapter = visual + self.prefix_query.weight[i - n_plain].view(1, 1, -1).repeat(
                    b, 1, 1
                )
            h = layer(h, fc, mask, adapter)
        return self.llama.output(self.llama.norm(h)).float()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int, std: float = 0.08) -> nn.Module:
    """Random values everywhere (biases, LoRA and gates non-zero); norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("gate") or "tok_embeddings" in name or "prefix_query" in name:
            p.copy_(0.5 * noise)
        else:
            p.copy_(std * noise)
    return model


def released_checkpoints(model: RefAdapter) -> tuple[dict, dict]:
    """(Meta base state dict, ImageBind-LLM ``{"model": ...}``), split as ``convert_ckpt.py``:
    the base keeps LLaMA's frozen weights (plus ``rope.freqs`` as Meta ships it); the adapter
    file keeps bridge, prefix_query and the llama gate/bias/lora/norm tensors."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base, adapter = {}, {}
    for key, value in state.items():
        if key.startswith("llama."):
            inner = key[len("llama.") :]
            if any(s in inner for s in ("bias", "gate", "lora")):
                adapter[key] = value
            else:
                base[inner] = value
                if "norm" in inner:  # fine-tuned norms ride in the adapter file too
                    adapter[key] = value
        else:
            adapter[key] = value
    hd = model.llama.head_dim
    base["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    return base, {"model": adapter}


def shard_meta(base: dict, n: int) -> list[dict]:
    """Split a Meta state dict into ``n`` model-parallel shards the way Meta's files are."""
    dim0 = ("wq.", "wk.", "wv.", "w1.", "w3.", "output.")
    dim1 = ("wo.", "w2.", "tok_embeddings.")
    shards: list[dict] = [{} for _ in range(n)]
    for key, value in base.items():
        leaf = key.split(".")[-2] + "."
        if leaf in dim0:
            parts = value.chunk(n, dim=0)
        elif leaf in dim1:
            parts = value.chunk(n, dim=1)
        else:
            parts = [value] * n
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    return shards


def reference_train_loss(
    model: RefAdapter, tokens: torch.Tensor, labels: torch.Tensor, f_m: torch.Tensor
) -> torch.Tensor:
    """``LLaMA_adapter.forward(tokens, labels, imgs)`` in train mode, F~_M given: logits of
    positions 0..S-2 against labels 1..S-1, ``CrossEntropyLoss(ignore_index=0)``; a batch
    without labels gives ``output.mean() * 0``."""
    output = model(tokens, f_m)[:, :-1, :]
    labels = labels[:, 1:]
    if labels.sum() == 0:
        return output.mean() * 0
    criterion = nn.CrossEntropyLoss(ignore_index=0)
    return criterion(output.reshape(-1, output.shape[-1]), labels.flatten())


def reference_trainable(model: RefAdapter, phase: str) -> dict[str, nn.Parameter]:
    """``LLaMA_adapter.get_trainable_params(phase)``, written from the release."""
    trainable = {}
    for name, p in model.named_parameters():
        if phase == "finetune":
            if name.startswith("llama.") and any(s in name for s in ("norm", "bias", "lora")):
                trainable[name] = p
        elif name.startswith("llama."):
            if "gate" in name:
                trainable[name] = p
        elif name.startswith(("image_bind_", "prefix_query.")):
            trainable[name] = p
    return trainable
