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
    uri: Path,
    encoder: str,
    n: int,
    patches: int,
    width: int,
    seed: int = 0,
    also: dict[str, tuple[int, int]] | None = None,
) -> StoreConfig:
    """An images table whose cached patch tokens (``patch_tokens_<encoder>``, float16) carry
    their caption's colour and shape (one direction each, every patch) plus noise, so that a
    caption can be learned from the tokens alone; ``also`` adds encoders of (patches, width)
    whose tokens are noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((width, width)))[0][: len(COLOURS) + len(SHAPES)]
    captions, tokens = [], []
    for i in range(n):
        c, s = i % len(COLOURS), (i // len(COLOURS)) % len(SHAPES)
        captions.append(f"a {COLOURS[c]} {SHAPES[s]}")
        noise = 0.1 * rng.standard_normal((patches, width))
        tokens.append(2.0 * (basis[c] + basis[len(COLOURS) + s]) + noise)
    columns = {encoder: np.asarray(tokens)}
    for name, shape in (also or {}).items():
        columns[name] = rng.standard_normal((n, *shape))
    return tokens_table(uri, columns, captions)


def tokens_table(uri: Path, tokens: dict[str, np.ndarray], captions: list[str]) -> StoreConfig:
    """An images table (keys ``img-<i>``) holding each extra encoder's tokens [n, patches,
    width] as its ``patch_tokens_<name>`` column (float16), recorded in the metadata as
    ``embed --tokens --extra-encoder`` records them."""
    import lance

    from cachebind.store import images_schema

    n = len(captions)
    extra, meta, columns = {}, {}, {}
    for name, values in tokens.items():
        _, patches, width = values.shape
        extra[name] = (4, patches * width)
        meta[name] = {"tokens": {"layer": -2, "patches": patches, "width": width,
                                 "dtype": "float16", "cls": False}}  # fmt: skip
        flat = pa.array(np.asarray(values, dtype=np.float16).reshape(-1))
        columns[f"vector_{name}"] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ones(n * 4, "f4")), 4
        )
        columns[f"patch_tokens_{name}"] = pa.FixedSizeListArray.from_arrays(flat, patches * width)
    schema = images_schema(
        dtype="float32", dim=4, thumbnail=False, extra=extra, metadata={"extra_encoders": meta}
    )
    rows = image_rows(np.ones((n, 4), dtype=np.float32), dtype="float32")
    rows = rows.set_column(rows.schema.get_field_index("caption"), "caption", pa.array(captions))
    for name, column in columns.items():
        rows = rows.append_column(name, column)
    lance.write_dataset(rows.select(schema.names).cast(schema), str(uri / "images.lance"))
    return StoreConfig(uri=str(uri), table="images", vector_dtype="float32")
