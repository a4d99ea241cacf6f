"""Tables with planted meaning for the analysis tests: vectors near known text embeddings.

With random weights no text matches any image, so the tests plant it: each image row is its
label's class embedding (computed by the encoder under test) plus Gaussian noise whose norm is a
stated fraction of the smallest distance between two classes.
"""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
from tables import image_rows

from cachebind.config import EncoderConfig, Settings, StoreConfig, WeightsConfig
from cachebind.encode import Encoder


def tiny_encoder(weights_dir: Path) -> Encoder:
    return Encoder.from_config(
        EncoderConfig(preset="tiny", device="cpu", dtype="float32"), WeightsConfig(dir=weights_dir)
    )


def planted_vectors(
    classes: np.ndarray, n: int, noise_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [n, d] unit-norm, truth codes [n]): row i is class i % L plus isotropic noise of
    norm ``noise_fraction`` x the smallest distance between two class embeddings."""
    rng = np.random.default_rng(seed)
    codes = np.arange(n) % len(classes)
    gaps = np.linalg.norm(classes[:, None, :] - classes[None, :, :], axis=-1)
    min_gap = gaps[~np.eye(len(classes), dtype=bool)].min()
    noise = rng.standard_normal((n, classes.shape[1]))
    noise *= noise_fraction * min_gap / np.linalg.norm(noise, axis=1, keepdims=True)
    vectors = classes[codes] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), codes


def labelled_table(
    db: Path, vectors: np.ndarray, truth: list[str | None], *, name: str = "images"
) -> StoreConfig:
    """An images table (float32 vectors) with an extra ``truth`` string column."""
    rows = image_rows(vectors, dtype="float32")
    rows = rows.append_column(pa.field("truth", pa.string()), pa.array(truth, pa.string()))
    lancedb.connect(str(db)).create_table(name, rows)
    return StoreConfig(uri=str(db), table=name, vector_dtype="float32")


def analysis_settings(store: StoreConfig, weights_dir: Path, **analysis: object) -> Settings:
    return Settings(
        encoder=EncoderConfig(preset="tiny", device="cpu", dtype="float32"),
        weights=WeightsConfig(dir=weights_dir),
        store=store,
        analysis=analysis,
    )
