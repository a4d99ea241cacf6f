"""Build an ``AdapterLlama`` from files as distributed.

* Base LLaMA: a Meta directory (``params.json`` + ``consolidated.*.pth``, possibly several
  model-parallel shards, ``tokenizer.model`` beside it or one level up — the released code expects
  ``<llama_dir>/7B/`` and ``<llama_dir>/tokenizer.model``), or a transformers LLaMA directory
  (``config.json`` + ``*.safetensors`` / ``pytorch_model*.bin`` + ``tokenizer.model``).
* Adapter: an ImageBind-LLM checkpoint as released, ``{"model": state_dict}`` (7B, 7B-beta,
  7B-pretrained): ``image_bind_*``, ``prefix_query.weight`` and ``llama.*`` gate / bias / LoRA /
  norm tensors, which override the base's.

The structure (bias, LoRA rank, adapted layers, bind variant and widths) is read from the
tensors. Every tensor the model needs must be found (else ``WeightsError`` naming the keys);
every file tensor left unused is named in the ``LoadReport``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from cachebind.bind import detect_variant
from cachebind.errors import WeightsError
from cachebind.inject.convert import (
    convert_adapter_top_level,
    convert_llama,
    hf_to_meta,
    merge_meta_shards,
    model_to_file_key,
)
from cachebind.inject.model import AdapterLlama, AdapterLlamaConfig
from cachebind.inject.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What loading used: sources, detected structure, tensors nobody consumed."""

    llama_format: Literal["meta", "hf"]
    llama_files: list[str]
    adapter_file: str
    config: AdapterLlamaConfig
    unused: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)  # base tensors the adapter replaced


@dataclass
class LlamaSource:
    """Where a base LLaMA's files are."""

    format: Literal["meta", "hf"]
    weights: list[Path]
    tokenizer: Path
    params: dict


def _torch_load(path: Path) -> dict:
    """Tensors only (``weights_only``: a checkpoint cannot run code), memory-mapped when the
    file's format allows it so that 7B shards are not read twice."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the unreadable file
        raise WeightsError(f"cannot read checkpoint {path}: {e}") from e


def find_llama(llama_dir: Path) -> LlamaSource:
    """Locate a Meta or transformers LLaMA under ``llama_dir``."""
    llama_dir = Path(llama_dir)
    if not llama_dir.is_dir():
        raise WeightsError(f"LLaMA directory not found: {llama_dir}")
    candidates = [llama_dir, llama_dir / "7B"]
    for d in candidates:
        if (d / "params.json").is_file():
            shards = sorted(d.glob("consolidated.*.pth"))
            if not shards:
                raise WeightsError(f"{d} has params.json but no consolidated.*.pth")
            tok = next(
                (p for p in (d / "tokenizer.model", d.parent / "tokenizer.model") if p.is_file()),
                None,
            )
            if tok is None:
                raise WeightsError(f"no tokenizer.model in {d} or {d.parent}")
            return LlamaSource("meta", shards, tok, json.loads((d / "params.json").read_text()))
    if (llama_dir / "config.json").is_file():
        weights = sorted(llama_dir.glob("*.safetensors")) or sorted(
            llama_dir.glob("pytorch_model*.bin")
        )
        if not weights:
            raise WeightsError(f"{llama_dir} has config.json but no weight files")
        tok = llama_dir / "tokenizer.model"
        if not tok.is_file():
            raise WeightsError(f"{llama_dir} has no sentencepiece tokenizer.model")
        return LlamaSource("hf", weights, tok, json.loads((llama_dir / "config.json").read_text()))
    raise WeightsError(
        f"{llama_dir} is neither a Meta LLaMA (params.json + consolidated.*.pth, here or in 7B/) "
        "nor a transformers LLaMA (config.json)"
    )


@dataclass(frozen=True)
class BaseShape:
    """What a base LLaMA's params.json / config.json say beyond its tensors."""

    n_heads: int
    n_kv_heads: int
    norm_eps: float
    rope_theta: float


def _heads(n_heads: int, n_kv_heads: int) -> tuple[int, int]:
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise WeightsError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    return n_heads, n_kv_heads


def _read_base(src: LlamaSource) -> tuple[dict, BaseShape, list[str]]:
    """(Meta-named state, its shape, unused keys)."""
    p = src.params
    if src.format == "meta":
        heads = _heads(int(p["n_heads"]), int(p.get("n_kv_heads") or p["n_heads"]))
        base = merge_meta_shards([_torch_load(f) for f in src.weights])
        shape = BaseShape(*heads, float(p.get("norm_eps", 1e-5)), float(p.get("rope_theta", 1e4)))
        return base, shape, []
    heads = _heads(
        int(p["num_attention_heads"]),
        int(p.get("num_key_value_heads") or p["num_attention_heads"]),
    )
    hf: dict[str, torch.Tensor] = {}
    for f in src.weights:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            hf.update(load_file(str(f)))
        else:
            hf.update(_torch_load(f))
    base, unused = hf_to_meta(hf, *heads)
    theta = (p.get("rope_parameters") or {}).get("rope_theta", p.get("rope_theta", 10000.0))
    return base, BaseShape(*heads, float(p.get("rms_norm_eps", 1e-6)), float(theta)), unused


def read_adapter_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The ``model`` dict of a released ImageBind-LLM checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ImageBind-LLM checkpoint not found: {path}")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise WeightsError(f"{path} is not an ImageBind-LLM checkpoint ({{'model': state_dict}})")
    # Early releases spelled the prefix "llma" (the released convert_ckpt.py renames it).
    return {k.replace("llma.", "llama.", 1): v for k, v in ckpt["model"].items()}


def infer_config(
    base: dict,
    adapter: dict,
    shape: BaseShape,
    tok: Tokenizer,
    bind_variant: str,
    max_seq_len: int,
) -> AdapterLlamaConfig:
    """The model shape the tensors describe."""
    try:
        vocab, dim = base["tok_embeddings.weight"].shape
        n_layers = 1 + max(int(k.split(".")[1]) for k in base if k.startswith("layers."))
        ffn_hidden = base["layers.0.feed_forward.w1.weight"].shape[0]
        prefix = adapter["prefix_query.weight"]
        bind_proj = adapter["image_bind_proj.weight"]
        bind_hidden = adapter["image_bind_f1_1.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"checkpoint lacks {e.args[0]!r}") from None
    if vocab != tok.n_words:
        raise WeightsError(f"tokenizer has {tok.n_words} words, tok_embeddings {vocab} rows")
    if prefix.shape[1] != dim or bind_proj.shape[0] != dim:
        raise WeightsError(
            f"adapter width {prefix.shape[1]} / {bind_proj.shape[0]} != LLaMA dim {dim}"
        )
    detected = detect_variant(k for k in adapter if k.startswith("image_bind_"))
    if bind_variant not in ("auto", detected):
        raise WeightsError(
            f"checkpoint holds the {detected!r} bind network, configured {bind_variant!r}"
        )
    lora = adapter.get("llama.layers.0.attention.lora_wq_l1.weight")
    return AdapterLlamaConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads,
        vocab_size=vocab,
        ffn_hidden=ffn_hidden,
        norm_eps=shape.norm_eps,
        rope_theta=shape.rope_theta,
        max_seq_len=max_seq_len,
        w_bias=any(k.endswith("attention.wq.bias") for k in adapter),
        lora_rank=0 if lora is None else int(lora.shape[0]),
        query_layer=int(prefix.shape[0]),
        bind_variant=detected,
        bind_in_dim=int(bind_proj.shape[1]),
        bind_hidden=int(bind_hidden),
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
    )


def load_adapter_llama(
    llama_dir: Path,
    adapter_checkpoint: Path,
    *,
    bind_variant: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_seq_len: int = 512,
) -> tuple[AdapterLlama, Tokenizer, LoadReport]:
    """Read, convert and load; returns (model in eval mode, tokenizer, report)."""
    src = find_llama(Path(llama_dir))
    tok = Tokenizer(src.tokenizer)
    base, shape, unused = _read_base(src)
    adapter = read_adapter_checkpoint(Path(adapter_checkpoint))
    cfg = infer_config(base, adapter, shape, tok, bind_variant, max_seq_len)

    # The adapter's llama.* tensors go over the base's (fine-tuned norms replace frozen ones).
    meta = dict(base)
    overridden = []
    for key, value in adapter.items():
        if key.startswith("llama."):
            inner = key[len("llama.") :]
            if inner in meta:
                overridden.append(inner)
            meta[inner] = value
    state, unused_llama = convert_llama(meta, shape.n_heads, shape.n_kv_heads)
    top, unused_top = convert_adapter_top_level(adapter)
    state.update(top)
    # Name each unused tensor as it is spelled in its own file.
    unused += [k if k in base else "llama." + k for k in unused_llama] + unused_top

    with torch.device("meta"):
        model = AdapterLlama(cfg)
    expected = model.state_dict()
    missing = sorted(model_to_file_key(k) for k in set(expected) - set(state))
    if missing:
        raise WeightsError(
            f"{len(missing)} tensors missing from {src.weights[0].parent} + {adapter_checkpoint}: "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    extra = sorted(set(state) - set(expected))  # e.g. LoRA on a layer the structure lacks
    unused = sorted(set(unused) | {model_to_file_key(k) for k in extra})
    for key in extra:
        del state[key]
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise WeightsError("tensor shapes do not match the model: " + "; ".join(bad[:10]))

    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inverse frequencies) were created on the meta device.
    rotary = model.llm.model.rotary_emb
    model.llm.model.rotary_emb = type(rotary)(model.llm.config).to(device)
    model.eval()
    if unused:
        log.warning("tensors not used by the model: %s", unused)
    report = LoadReport(
        llama_format=src.format,
        llama_files=[str(p) for p in src.weights],
        adapter_file=str(adapter_checkpoint),
        config=cfg,
        unused=unused,
        overridden=sorted(overridden),
    )
    return model, tok, report
