"""Real LanceDB ``images`` tables of synthetic embeddings, for tests of any stage.

store = make_images_table(tmp_path / "db", n=5000, dim=64, seed=0)
table = CacheTable.open(store)
"""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
from clustered_embeddings import clustered_vectors

from cachebind.config import StoreConfig
from cachebind.store import images_schema, row_id


def image_rows(
    vectors: np.ndarray, *, start: int = 0, prefix: str = "img", dtype: str = "float16"
) -> pa.Table:
    """Rows of the images schema for ``vectors`` (keys ``{prefix}-{start + i}``)."""
    n, dim = vectors.shape
    keys = [f"{prefix}-{start + i}" for i in range(n)]
    value = pa.float16() if dtype == "float16" else pa.float32()
    flat = pa.array(vectors.astype(np.float16 if dtype == "float16" else np.float32).reshape(-1))
    schema = images_schema(dtype=dtype, dim=dim, thumbnail=False)
    return pa.table(
        {
            "id": pa.array([row_id(k) for k in keys], pa.int64()),
            "key": keys,
            "caption": [f"caption {k}" for k in keys],
            "url": [f"https://example.com/{k}.jpg" for k in keys],
            "width": pa.array([256] * n, pa.int32()),
            "height": pa.array([256] * n, pa.int32()),
            "shard": ["00000"] * n,
            "vector": pa.FixedSizeListArray.from_arrays(flat.cast(value), dim),
        },
        schema=schema,
    )


def synthetic_vectors(n: int, dim: int, seed: int, clustered: bool = True) -> np.ndarray:
    if clustered:
        return clustered_vectors(n, dim, seed=seed)
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_images_table(
    uri: str | Path,
    n: int,
    dim: int,
    seed: int = 0,
    clustered: bool = True,
    *,
    name: str = "images",
    dtype: str = "float16",
) -> StoreConfig:
    """Create table ``name`` at ``uri`` with ``n`` rows of unit vectors; returns its StoreConfig."""
    db = lancedb.connect(str(uri))
    table = db.create_table(name, schema=images_schema(dtype=dtype, dim=dim, thumbnail=False))
    if n:
        table.add(image_rows(synthetic_vectors(n, dim, seed, clustered), dtype=dtype))
    return StoreConfig(uri=str(uri), table=name, vector_dtype=dtype)  # type: ignore[arg-type]


def append_rows(
    store: StoreConfig, n: int, dim: int, seed: int, *, start: int, clustered: bool = True
) -> None:
    """Append ``n`` new rows (keys from ``start``) to the table: a new table version."""
    table = lancedb.connect(store.uri).open_table(store.table)
    vectors = synthetic_vectors(n, dim, seed, clustered)
    table.add(image_rows(vectors, start=start, dtype=store.vector_dtype))
