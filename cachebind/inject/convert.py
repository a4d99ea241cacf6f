"""Checkpoint conversion: Meta LLaMA + released ImageBind-LLM tensors -> ``AdapterLlama`` names.

Meta's LLaMA rotates consecutive pairs (2i, 2i+1) of each head; transformers' LLaMA rotates the
two halves of the head. Moving a q/k projection from one to the other permutes its output rows:
reshape [out, ...] -> [n_heads, out/n_heads/2, 2, ...], swap axes 1 and 2, reshape back. The
permutation must follow everything that produces q or k rows: wq/wk weights, wq's bias, and the
output rows of ``lora_wq_l2`` / ``lora_wk_l2``. With grouped-query attention k has
``n_kv_heads`` heads, so k rows are permuted per KV head.
"""

from __future__ import annotations

import re

import torch

from cachebind.errors import WeightsError

# Meta per-layer module -> transformers per-layer module.
LAYER_MODULES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_LEVEL = {
    "tok_embeddings.weight": "llm.model.embed_tokens.weight",
    "norm.weight": "llm.model.norm.weight",
    "output.weight": "llm.lm_head.weight",
}
# Derived data Meta ships in consolidated.*.pth (recomputed by the rotary embedding).
IGNORED_META_KEYS = {"rope.freqs"}

_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_LORA = re.compile(r"(attention|feed_forward)\.lora_(w\w+?)_l([12])\.weight")
# Meta keys whose rows are q / k output channels (permuted for HF's rotary).
_Q_ROWS = re.compile(r"layers\.\d+\.attention\.(wq\.weight|wq\.bias|lora_wq_l2\.weight)")
_K_ROWS = re.compile(r"layers\.\d+\.attention\.(wk\.weight|wk\.bias|lora_wk_l2\.weight)")


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> HF (halves) order of the rows of ``w`` ([out] or [out, in])."""
    out = w.shape[0]
    return (
        w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(out, *w.shape[1:])
    )


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (halves) -> Meta (interleaved pairs): the inverse of ``permute_rotary``."""
    out = w.shape[0]
    return (
        w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(out, *w.shape[1:])
    )


def meta_to_model_key(key: str) -> str | None:
    """The ``AdapterLlama`` name of a Meta/released LLaMA key (``None``: not a model tensor)."""
    if key in TOP_LEVEL:
        return TOP_LEVEL[key]
    m = _LAYER_KEY.fullmatch(key)
    if not m:
        return None
    layer, rest = m.groups()
    prefix = f"llm.model.layers.{layer}."
    if rest == "attention.gate":
        return prefix + "self_attn.gate"
    lora = _LORA.fullmatch(rest)
    if lora:
        block, name, which = lora.groups()
        module = LAYER_MODULES.get(f"{block}.{name}")
        return None if module is None else f"{prefix}{module}.lora_l{which}.weight"
    module, _, leaf = rest.rpartition(".")
    if module in LAYER_MODULES and leaf in ("weight", "bias"):
        return f"{prefix}{LAYER_MODULES[module]}.{leaf}"
    return None


def convert_llama(
    meta: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int | None = None
) -> tuple[dict, list[str]]:
    """Meta-named LLaMA tensors (base + the adapter's ``llama.*`` overrides, prefix stripped)
    -> (``AdapterLlama`` state entries, keys that map to nothing)."""
    state: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in meta.items():
        if key in IGNORED_META_KEYS:
            continue
        target = meta_to_model_key(key)
        if target is None:
            unused.append(key)
            continue
        if _Q_ROWS.fullmatch(key):
            value = permute_rotary(value, n_heads)
        elif _K_ROWS.fullmatch(key):
            value = permute_rotary(value, n_kv_heads or n_heads)
        state[target] = value
    return state, unused


def convert_adapter_top_level(adapter: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Released non-``llama.`` keys: ``image_bind_*`` -> ``bind.*``, ``prefix_query.weight``."""
    state: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in adapter.items():
        if key.startswith("llama."):
            continue
        if key.startswith("image_bind_"):
            state["bind." + key] = value
        elif key == "prefix_query.weight":
            state[key] = value
        else:  # e.g. "image_bind.*": the ImageBind encoder, which this model does not hold
            unused.append(key)
    return state, unused


# Model-parallel shards of Meta checkpoints: concatenation axis per leaf module (others are
# replicated in every shard).
_SHARD_DIM0 = {"wq", "wk", "wv", "w1", "w3", "output"}
_SHARD_DIM1 = {"wo", "w2", "tok_embeddings"}


def merge_meta_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join ``consolidated.0*.pth`` model-parallel shards into one Meta state dict."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = set(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != keys:
            diff = sorted(keys.symmetric_difference(shard))[:10]
            raise WeightsError(f"LLaMA shard {i} holds different keys than shard 0: {diff}")
    merged = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        leaf = key.split(".")[-2] if "." in key else key
        if leaf in _SHARD_DIM0:
            merged[key] = torch.cat(parts, dim=0)
        elif leaf in _SHARD_DIM1:
            merged[key] = torch.cat(parts, dim=1)
        else:
            merged[key] = parts[0]
    return merged


_HF_TO_META = {v: k for k, v in LAYER_MODULES.items()}
_HF_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_to_meta(
    hf: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int | None = None
) -> tuple[dict, list[str]]:
    """A transformers LLaMA state dict in Meta names and rotary order (q/k rows un-permuted),
    so base weights from either source go through one conversion. Returns (meta, unused)."""
    meta: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in hf.items():
        if key in _HF_TOP:
            meta[_HF_TOP[key]] = value
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        module = _HF_TO_META.get(m.group(2)) if m else None
        if m is None or module is None:
            if not key.endswith("rotary_emb.inv_freq"):
                unused.append(key)
            continue
        if module == "attention.wq":
            value = unpermute_rotary(value, n_heads)
        elif module == "attention.wk":
            value = unpermute_rotary(value, n_kv_heads or n_heads)
        meta[f"layers.{m.group(1)}.{module}.{m.group(3)}"] = value
    return meta, unused


_MODEL_LAYER = re.compile(r"llm\.model\.layers\.(\d+)\.(.+?)\.(lora_l[12]\.weight|weight|bias)")


def model_to_file_key(key: str) -> str:
    """The released file name of an ``AdapterLlama`` tensor, for error messages: Meta names
    for the base, ``llama.``-prefixed names for the adapter's gate / bias / LoRA tensors."""
    if key.startswith("bind."):
        return key[len("bind.") :]
    inverse_top = {v: k for k, v in TOP_LEVEL.items()}
    if key in inverse_top:
        return inverse_top[key]
    gate = re.fullmatch(r"llm\.model\.layers\.(\d+)\.self_attn\.gate", key)
    if gate:
        return f"llama.layers.{gate.group(1)}.attention.gate"
    m = _MODEL_LAYER.fullmatch(key)
    if not m or m.group(2) not in _HF_TO_META:
        return key
    layer, module, leaf = m.group(1), _HF_TO_META[m.group(2)], m.group(3)
    if leaf.startswith("lora"):
        block, name = module.split(".")
        return f"llama.layers.{layer}.{block}.lora_{name}_{leaf[len('lora_') :]}"
    prefix = "llama." if leaf == "bias" else ""
    return f"{prefix}layers.{layer}.{module}.{leaf}"
