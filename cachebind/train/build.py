"""The model a training run starts from, in the released layout, loaded like any checkpoint.

Stage 1 starts from the release's initialisation (``LLaMA_adapter.__init__``): PyTorch's default
``nn.Linear`` init for the bridge, RMSNorm scales 1, ``prefix_query`` N(0, 1), zero gates, so the
untrained model is exactly the base LLM. Stage 2 starts from a stage-1 file and, where it has
none yet, adds the release's bias (0) and LoRA (``l1`` default init, ``l2`` 0) tensors, so it too
starts where stage 1 ended. Either way the start is written as a ``{"model": ...}`` file and read
back through ``inject.load``: training and serving share one conversion path, and the bind
network's output width follows the base LLM's (any Llama-family width, GQA included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cachebind.bind import Variant
from cachebind.errors import WeightsError
from cachebind.inject.load import find_llama, read_adapter_checkpoint
from cachebind.inject.model import ffn_hidden_dim
from cachebind.train.params import Phase


@dataclass(frozen=True)
class BaseDims:
    """What the adapter's tensors need to know of the base LLM."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int


def base_dims(llama_dir: Path) -> BaseDims:
    """Read from ``params.json`` (Meta) or ``config.json`` (transformers)."""
    src = find_llama(Path(llama_dir))
    p = src.params
    if src.format == "meta":
        dim, heads = int(p["dim"]), int(p["n_heads"])
        ffn = ffn_hidden_dim(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier"))
        return BaseDims(dim, int(p["n_layers"]), heads, int(p.get("n_kv_heads") or heads), ffn)
    heads = int(p["num_attention_heads"])
    return BaseDims(
        int(p["hidden_size"]),
        int(p["num_hidden_layers"]),
        heads,
        int(p.get("num_key_value_heads") or heads),
        int(p["intermediate_size"]),
    )


def _linear(g: torch.Generator, n_in: int, n_out: int, bias: bool) -> dict[str, torch.Tensor]:
    """``nn.Linear``'s default init (kaiming-uniform, a=√5: U(±1/√in)), seeded."""
    bound = 1.0 / n_in**0.5
    out = {"weight": (torch.rand(n_out, n_in, generator=g) * 2 - 1) * bound}
    if bias:
        out["bias"] = (torch.rand(n_out, generator=g) * 2 - 1) * bound
    return out


def pretrain_init(dims: BaseDims, in_dim: int, variant: Variant, seed: int) -> dict:
    """Released names -> tensors of a fresh stage-1 adapter (bridge hidden 4·dim, one prefix
    query per layer, as the 7B release)."""
    g = torch.Generator().manual_seed(seed)
    d, hidden, legacy = dims.dim, 4 * dims.dim, variant == "layernorm"
    state: dict[str, torch.Tensor] = {}
    for k, v in _linear(g, in_dim, d, bias=True).items():
        state[f"image_bind_proj.{k}"] = v
    for j in (1, 2, 3):
        state[f"image_bind_norm_{j}.weight"] = torch.ones(d)
        if legacy:
            state[f"image_bind_norm_{j}.bias"] = torch.zeros(d)
        for f, (n_in, n_out) in {"f1": (d, hidden), "f2": (hidden, d), "f3": (d, hidden)}.items():
            for k, v in _linear(g, n_in, n_out, bias=legacy).items():
                state[f"image_bind_{f}_{j}.{k}"] = v
    state["prefix_query.weight"] = torch.randn(dims.n_layers, d, generator=g)
    for i in range(dims.n_layers):
        state[f"llama.layers.{i}.attention.gate"] = torch.zeros(1, dims.n_heads, 1, 1)
    return state


def add_finetune_tensors(state: dict, dims: BaseDims, lora_rank: int, seed: int) -> dict:
    """Stage 2's bias and LoRA tensors, initialised as the release, where ``state`` lacks them."""
    if any("lora_" in k for k in state):
        return state
    g = torch.Generator().manual_seed(seed + 1)
    d, kv = dims.dim, dims.n_kv_heads * (dims.dim // dims.n_heads)
    shapes = {
        "attention.wq": (d, d, True),
        "attention.wk": (d, kv, False),
        "attention.wv": (d, kv, False),
        "attention.wo": (d, d, True),
        "feed_forward.w1": (d, dims.ffn_hidden, True),
        "feed_forward.w2": (dims.ffn_hidden, d, True),
        "feed_forward.w3": (d, dims.ffn_hidden, True),
    }
    out = dict(state)
    for i in range(dims.n_layers):
        for module, (n_in, n_out, bias) in shapes.items():
            block, name = module.split(".")
            p = f"llama.layers.{i}.{block}."
            if bias:
                out[p + f"{name}.bias"] = torch.zeros(n_out)
            out[p + f"lora_{name}_l1.weight"] = _linear(g, n_in, lora_rank, bias=False)["weight"]
            out[p + f"lora_{name}_l2.weight"] = torch.zeros(n_out, lora_rank)
    return out


def write_start(
    path: Path,
    llama_dir: Path,
    phase: Phase,
    *,
    in_dim: int,
    init_checkpoint: Path | None,
    variant: Variant,
    lora_rank: int,
    seed: int,
) -> Path:
    """Write the starting ``{"model": ...}`` file of a run (atomically) and return its path."""
    dims = base_dims(llama_dir)
    if init_checkpoint is not None:
        state = read_adapter_checkpoint(Path(init_checkpoint))
        have = state["image_bind_proj.weight"].shape[1]
        if have != in_dim:
            raise WeightsError(f"{init_checkpoint} takes {have}-d features, the cache has {in_dim}")
    elif phase == "finetune":
        raise WeightsError("finetune starts from a stage-1 checkpoint: set train.init_checkpoint")
    else:
        state = pretrain_init(dims, in_dim, variant, seed)
    if phase == "finetune":
        state = add_finetune_tensors(state, dims, lora_rank, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"model": {k: v.float().contiguous() for k, v in state.items()}}, tmp)
    os.replace(tmp, path)
    return path


def zero_gates_are_closed(model: nn.Module) -> bool:
    """True when every gate is 0 (the untrained model is the base LLM)."""
    return all(
        bool((p == 0).all()) for n, p in model.named_parameters() if n.endswith("self_attn.gate")
    )
