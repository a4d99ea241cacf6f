"""A tiny LLaMA + ImageBind-LLM adapter written in the released file layouts (for the demo,
tests and benchmarks; no downloadable weights are needed).

``build_tiny_llm`` trains a small sentencepiece tokenizer on a fixed generated corpus, writes a
Meta-layout LLaMA (``7B/params.json``, ``7B/consolidated.00.pth``, ``tokenizer.model``) and a
released-layout ImageBind-LLM checkpoint (``{"model": ...}`` with bridge, prefix_query, non-zero
gates, biases, LoRA and norms), then loads them through ``load_generator`` — the same conversion
path real checkpoints take. Values are random, so the text is gibberish, but it depends on the
visual input because the gates are open.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from cachebind.bind import Variant
from cachebind.config import LLMConfig
from cachebind.inject.generate import Generator, load_generator
from cachebind.inject.model import ffn_hidden_dim
from cachebind.inject.prompts import PROMPT_INPUT, PROMPT_NO_INPUT

_WORDS = [
    "a",
    "an",
    "the",
    "image",
    "photo",
    "picture",
    "of",
    "with",
    "and",
    "in",
    "on",
    "at",
    "by",
    "dog",
    "cat",
    "bird",
    "car",
    "tree",
    "house",
    "river",
    "sky",
    "sea",
    "mountain",
    "city",
    "street",
    "person",
    "people",
    "child",
    "woman",
    "man",
    "playing",
    "running",
    "sitting",
    "standing",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "small",
    "large",
    "old",
    "young",
    "happy",
    "quiet",
    "loud",
    "music",
    "sound",
    "describe",
    "what",
    "is",
    "this",
    "shows",
    "there",
    "are",
    "two",
    "three",
    "many",
    "near",
    "next",
    "to",
    "under",
    "above",
    "beautiful",
    "sunny",
    "day",
    "night",
    "snow",
    "rain",
    "water",
    "grass",
    "road",
    "bridge",
    "boat",
    "train",
    "plane",
    "flower",
    "food",
    "table",
    "window",
]


def tiny_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """A fixed, generated English-like corpus (plus the Alpaca templates) for the tokenizer."""
    rng = random.Random(seed)
    lines = [PROMPT_NO_INPUT, PROMPT_INPUT]
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


def train_tokenizer(
    path: Path, vocab_size: int = 512, seed: int = 0, extra_lines: Sequence[str] = ()
) -> Path:
    """A LLaMA-like sentencepiece BPE model (unk 0, bos 1, eos 2, no pad, byte fallback);
    ``extra_lines`` join the corpus (e.g. a collection's captions, so they tokenise short)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*tiny_corpus(seed=seed), *extra_lines]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def _rand(g: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def write_meta_llama(
    model_dir: Path,
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    multiple_of: int = 32,
    norm_eps: float = 1e-6,
    seed: int = 0,
) -> Path:
    """Meta's layout: ``params.json`` + ``consolidated.00.pth`` (fp16, as Meta ships it)."""
    g = torch.Generator().manual_seed(seed)
    hidden = ffn_hidden_dim(dim, multiple_of)
    head_dim = dim // n_heads
    state = {
        "tok_embeddings.weight": _rand(g, vocab_size, dim, std=1.0),
        "norm.weight": 1 + _rand(g, dim, std=0.1),
        "output.weight": _rand(g, vocab_size, dim, std=dim**-0.5),
        "rope.freqs": 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)),
    }
    for i in range(n_layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            state[p + f"attention.{name}.weight"] = _rand(g, dim, dim, std=dim**-0.5)
        state[p + "feed_forward.w1.weight"] = _rand(g, hidden, dim, std=dim**-0.5)
        state[p + "feed_forward.w2.weight"] = _rand(g, dim, hidden, std=hidden**-0.5)
        state[p + "feed_forward.w3.weight"] = _rand(g, hidden, dim, std=dim**-0.5)
        state[p + "attention_norm.weight"] = 1 + _rand(g, dim, std=0.1)
        state[p + "ffn_norm.weight"] = 1 + _rand(g, dim, std=0.1)
    model_dir.mkdir(parents=True, exist_ok=True)
    params = {
        "dim": dim,
        "multiple_of": multiple_of,
        "n_heads": n_heads,
        "n_layers": n_layers,
        "norm_eps": norm_eps,
        "vocab_size": -1,
    }
    (model_dir / "params.json").write_text(json.dumps(params))
    torch.save({k: v.half() for k, v in state.items()}, model_dir / "consolidated.00.pth")
    return model_dir


def write_adapter_checkpoint(
    path: Path,
    *,
    dim: int,
    n_layers: int,
    n_heads: int,
    multiple_of: int = 32,
    visual_dim: int = 1024,
    variant: Variant = "rmsnorm",
    lora_rank: int = 16,
    w_bias: bool = True,
    seed: int = 1,
) -> Path:
    """A released-layout ImageBind-LLM checkpoint ``{"model": state_dict}``; ``variant``
    ``rmsnorm`` is today's ``7B.pth`` bridge, ``layernorm`` 7B-beta's."""
    g = torch.Generator().manual_seed(seed)
    hidden, bind_hidden = ffn_hidden_dim(dim, multiple_of), 4 * dim
    legacy = variant == "layernorm"
    m: dict[str, torch.Tensor] = {
        "image_bind_proj.weight": _rand(g, dim, visual_dim, std=visual_dim**-0.5 * 4),
        "image_bind_proj.bias": _rand(g, dim, std=0.1),
        "prefix_query.weight": _rand(g, n_layers, dim, std=0.5),
        "llama.norm.weight": 1 + _rand(g, dim, std=0.1),
    }
    for j in (1, 2, 3):
        m[f"image_bind_norm_{j}.weight"] = 1 + _rand(g, dim, std=0.1)
        if legacy:
            m[f"image_bind_norm_{j}.bias"] = _rand(g, dim, std=0.1)
        for f, (o, i) in {
            "f1": (bind_hidden, dim),
            "f2": (dim, bind_hidden),
            "f3": (bind_hidden, dim),
        }.items():
            m[f"image_bind_{f}_{j}.weight"] = _rand(g, o, i, std=i**-0.5)
            if legacy:
                m[f"image_bind_{f}_{j}.bias"] = _rand(g, o, std=0.05)
    shapes = {
        "wq": (dim, dim),
        "wk": (dim, dim),
        "wv": (dim, dim),
        "wo": (dim, dim),
        "w1": (hidden, dim),
        "w2": (dim, hidden),
        "w3": (hidden, dim),
    }
    for i in range(n_layers):
        p = f"llama.layers.{i}."
        m[p + "attention.gate"] = _rand(g, 1, n_heads, 1, 1, std=0.8)
        m[p + "attention_norm.weight"] = 1 + _rand(g, dim, std=0.1)
        m[p + "ffn_norm.weight"] = 1 + _rand(g, dim, std=0.1)
        for name, (out, inp) in shapes.items():
            block = "attention" if name in ("wq", "wk", "wv", "wo") else "feed_forward"
            if w_bias and name in ("wq", "wo", "w1", "w2", "w3"):
                m[p + f"{block}.{name}.bias"] = _rand(g, out, std=0.05)
            if lora_rank:
                m[p + f"{block}.lora_{name}_l1.weight"] = _rand(g, lora_rank, inp, std=inp**-0.5)
                m[p + f"{block}.lora_{name}_l2.weight"] = _rand(g, out, lora_rank, std=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m}, path)
    return path


def build_tiny_llm(
    workdir: Path,
    seed: int = 0,
    *,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    visual_dim: int = 1024,
    vocab_size: int = 512,
    bind_variant: Variant = "layernorm",
) -> Generator:
    """Write a tiny LLaMA + ImageBind-LLM checkpoint under ``workdir`` and load it (CPU, fp32).

    The bridge defaults to 7B-beta's LayerNorm one, the variant with the most tensors (block
    biases), which the generation tests' independent reference is built with.

    Layout written: ``workdir/tokenizer.model``, ``workdir/7B/{params.json,consolidated.00.pth}``
    (the released ``llama_dir``) and ``workdir/imagebind_llm_tiny.pth``.
    """
    workdir = Path(workdir)
    tok = train_tokenizer(workdir / "tokenizer.model", vocab_size=vocab_size, seed=seed)
    vocab = spm.SentencePieceProcessor(model_file=str(tok)).vocab_size()
    write_meta_llama(
        workdir / "7B", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, seed=seed
    )
    adapter = write_adapter_checkpoint(
        workdir / "imagebind_llm_tiny.pth",
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        visual_dim=visual_dim,
        variant=bind_variant,
        seed=seed + 1,
    )
    cfg = LLMConfig(llama_dir=workdir, adapter_checkpoint=adapter, device="cpu", dtype="float32")
    return load_generator(cfg, seed=seed)
