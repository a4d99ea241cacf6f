"""Small inputs for the training tests: a tiny Meta-layout LLaMA and a captioned cache table."""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
from tables import image_rows

from cachebind.config import Settings, StoreConfig
from cachebind.inject.tiny import train_tokenizer, write_meta_llama
from cachebind.inject.tokenizer import Tokenizer

COLOURS = ("red", "green", "blue", "white")
SHAPES = ("circle", "square", "star")


def tiny_llama(root: Path, dim: int = 32, n_layers: int = 2, n_heads: int = 4) -> Path:
    """``root/tokenizer.model`` + ``root/7B/{params.json, consolidated.00.pth}``."""
    tok = train_tokenizer(root / "tokenizer.model", vocab_size=512)
    vocab = Tokenizer(tok).n_words
    write_meta_llama(root / "7B", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads)
    return root


def caption_table(uri: Path, n: int = 48, dim: int = 16, seed: int = 0) -> StoreConfig:
    """An images table whose vectors carry their caption's colour and shape (one direction
    each) plus noise, so that a caption can be learned from F_M."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0][: len(COLOURS) + len(SHAPES)]
    captions, vectors = [], []
    for i in range(n):
        c, s = i % len(COLOURS), (i // len(COLOURS)) % len(SHAPES)
        captions.append(f"a {COLOURS[c]} {SHAPES[s]}")
        v = basis[c] + basis[len(COLOURS) + s] + 0.1 * rng.standard_normal(dim)
        vectors.append(v / np.linalg.norm(v))
    rows = image_rows(np.asarray(vectors, dtype=np.float32), dtype="float32")
    rows = rows.set_column(rows.schema.get_field_index("caption"), "caption", pa.array(captions))
    db = lancedb.connect(str(uri))
    db.create_table("images", rows, mode="overwrite")
    return StoreConfig(uri=str(uri), table="images", vector_dtype="float32")


def train_settings(root: Path, store: StoreConfig, llama_dir: Path, **train) -> Settings:
    values = {
        "llama_dir": str(llama_dir),
        "output_dir": str(root / "train"),
        "batch_size": 2,
        "max_words": 128,
        "epochs": 1.0,
        "warmup_epochs": 0.0,
        "lr": 1e-3,
        "checkpoint_every": 2,
        "progress": False,
        "data_cpus": 0.1,
        **train,
    }
    return Settings(store=store.model_dump(), train=values)


def token_caption_table(
    uri: Path, encoder: str, n: int, patches: int, width: int, seed: int = 0
) -> StoreConfig:
    """An images table whose cached patch tokens (``patch_tokens_<encoder>``, float16) carry
    their caption's colour and shape (one direction each, every patch) plus noise, so that a
    caption can be learned from the tokens alone."""
    import lance

    from cachebind.store import images_schema

    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((width, width)))[0][: len(COLOURS) + len(SHAPES)]
    captions, tokens = [], []
    for i in range(n):
        c, s = i % len(COLOURS), (i // len(COLOURS)) % len(SHAPES)
        captions.append(f"a {COLOURS[c]} {SHAPES[s]}")
        noise = 0.1 * rng.standard_normal((patches, width))
        tokens.append(2.0 * (basis[c] + basis[len(COLOURS) + s]) + noise)
    flat = np.asarray(tokens, dtype=np.float16).reshape(-1)
    shape = {"layer": -2, "patches": patches, "width": width, "dtype": "float16", "cls": False}
    schema = images_schema(
        dtype="float32", dim=4, thumbnail=False, extra={encoder: (4, patches * width)},
        metadata={"extra_encoders": {encoder: {"tokens": shape}}},
    )  # fmt: skip
    rows = image_rows(rng.standard_normal((n, 4)).astype(np.float32), dtype="float32")
    rows = rows.set_column(rows.schema.get_field_index("caption"), "caption", pa.array(captions))
    rows = rows.append_column(
        f"vector_{encoder}", pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 4, "f4")), 4)
    ).append_column(
        f"patch_tokens_{encoder}",
        pa.FixedSizeListArray.from_arrays(pa.array(flat), patches * width),
    )
    lance.write_dataset(rows.cast(schema), str(uri / "images.lance"))
    return StoreConfig(uri=str(uri), table="images", vector_dtype="float32")
