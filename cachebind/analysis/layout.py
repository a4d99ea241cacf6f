"""A 2-D map of the collection: a layout fitted on a sample, every row placed by it.

UMAP (umap-learn 0.5, cosine metric) or PCA is fitted on ``analysis.map_sample`` rows; the
whole table is then placed partition by partition (:mod:`cachebind.analysis.map_run`, or the
Ray job ``jobs/map.py``). The positions are stored as the table ``<table>_map_v<version>``: one
map per images-table version, whose metadata records the method, sample, seed and the table
holding the fitted model (``<table>_map_v<version>_model_<run>``), which places a query on the
map exactly as the rows were placed.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from cachebind.analysis.labelling import open_side_table, table_names
from cachebind.config import StoreConfig
from cachebind.store import connect

METADATA_KEY = b"cachebind_map"
MAP_SCHEMA_FIELDS = [
    pa.field("id", pa.int64(), nullable=False),
    pa.field("x", pa.float32(), nullable=False),
    pa.field("y", pa.float32(), nullable=False),
]
MODEL_SCHEMA = pa.schema(
    [pa.field("method", pa.string(), nullable=False), pa.field("model", pa.large_binary())]
)


def map_table_name(table: str, version: int) -> str:
    return f"{table}_map_v{version}"


def run_key(method: str, sample: int, seed: int, neighbours: int) -> str:
    """Names what a layout was fitted with: a run resumes only a run with the same key."""
    spec = json.dumps([method, sample, seed, neighbours])
    return hashlib.blake2b(spec.encode("utf-8"), digest_size=6).hexdigest()


def model_table_name(map_name: str, key: str) -> str:
    return f"{map_name}_model_{key}"


class Projection:
    """A fitted 2-D layout: ``transform(vectors [n, d]) -> [n, 2]``."""

    def __init__(self, method: str, model: Any, mean: np.ndarray | None = None) -> None:
        self.method = method
        self.model = model
        self.mean = mean

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.method == "pca":
            return ((vectors - self.mean) @ self.model).astype(np.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return np.asarray(self.model.transform(vectors), dtype=np.float32)

    def to_bytes(self) -> bytes:
        """PCA: its components and mean as an ``.npz`` (no pickle); UMAP: the pickled fitted
        object (umap-learn has no other format), which holds its fit sample."""
        if self.method == "pca":
            assert self.mean is not None  # a PCA projection is made with its mean
            out = io.BytesIO()
            np.savez(out, components=self.model, mean=self.mean)
            return out.getvalue()
        return pickle.dumps(self.model, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_bytes(cls, method: str, blob: bytes) -> Projection:
        """The inverse of :meth:`to_bytes`. A UMAP model is unpickled: it must come from a
        store this deployment writes (the map job's own model table), never from a request."""
        if method == "pca":
            arrays = np.load(io.BytesIO(blob), allow_pickle=False)
            return cls("pca", arrays["components"], arrays["mean"])
        if method != "umap":
            raise ValueError(f"unknown map method {method!r}")
        return cls("umap", pickle.loads(blob))  # noqa: S301 -- the store's own model table


def fit_projection(
    sample: np.ndarray, method: Literal["umap", "pca"], neighbours: int, seed: int
) -> Projection:
    sample = np.asarray(sample, dtype=np.float32)
    if method == "pca" or len(sample) <= neighbours + 1:
        mean = sample.mean(0)
        _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
        return Projection("pca", vt[:2].T.astype(np.float32), mean)
    import umap  # the analysis extra; numba compiles on first use

    model = umap.UMAP(
        n_components=2, n_neighbors=neighbours, metric="cosine", random_state=seed, n_jobs=1
    )
    with warnings.catch_warnings():
        # A seed makes umap-learn single-threaded, and it says so on every fit.
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        model.fit(sample)
    return Projection("umap", model)


def write_model(store: StoreConfig, name: str, projection: Projection) -> None:
    """One row, one commit: a crash leaves the model table whole or absent."""
    row = pa.table(
        {"method": [projection.method], "model": [projection.to_bytes()]}, schema=MODEL_SCHEMA
    )
    connect(store).create_table(name, row, schema=MODEL_SCHEMA, mode="overwrite")


def read_model(store: StoreConfig, name: str) -> Projection | None:
    """The fitted layout stored as ``name`` (None when there is none)."""
    try:
        handle = connect(store).open_table(name)
    except ValueError:
        return None
    rows = handle.to_lance().to_table()
    if rows.num_rows != 1:
        return None
    return Projection.from_bytes(rows["method"][0].as_py(), rows["model"][0].as_py())


def map_metadata(store: StoreConfig, version: int) -> dict[str, Any]:
    """What the stored map of ``version`` records (FileNotFoundError when there is none)."""
    name = map_table_name(store.table, version)
    try:
        handle = connect(store).open_table(name)
    except ValueError as exc:
        raise FileNotFoundError(
            f"no map of table version {version}: run `cachebind map` first"
        ) from exc
    return json.loads((handle.schema.metadata or {}).get(METADATA_KEY, b"{}"))


def load_projection(store: StoreConfig, version: int) -> Projection:
    """The model the map of ``version`` was placed with (FileNotFoundError when the map, or a
    model for it, is missing: maps computed before models were stored have none)."""
    meta = map_metadata(store, version)
    projection = read_model(store, meta["model"]) if meta.get("model") else None
    if projection is None:
        raise FileNotFoundError(
            f"the map of table version {version} has no stored layout model: run "
            "`cachebind map` again"
        )
    return projection


@dataclass
class CollectionMap:
    """A stored map: positions by id and what made them."""

    name: str
    table_version: int
    method: str
    points: pa.Table
    """id, x, y (and label when read with a label table)."""


def read_map(
    store: StoreConfig,
    version: int,
    *,
    labels_table: str | None = None,
    max_points: int | None = None,
    seed: int = 0,
) -> CollectionMap:
    """The map of table version ``version`` (FileNotFoundError when none was computed), with
    each point's zero-shot label from ``labels_table`` when given."""
    name = map_table_name(store.table, version)
    db = connect(store)
    try:
        handle = db.open_table(name)
    except ValueError as exc:
        raise FileNotFoundError(
            f"no map of table version {version}: run `cachebind map` first"
        ) from exc
    meta = json.loads((handle.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    dataset = handle.to_lance()
    n = dataset.count_rows()
    if max_points is not None and n > max_points:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(n, max_points, replace=False))
        points = dataset.take(keep.tolist())
    else:
        points = dataset.to_table()
    if labels_table is not None:
        side = open_side_table(store, labels_table).to_lance().to_table(columns=["id", "label"])
        points = points.join(side, "id", join_type="left outer")
    return CollectionMap(name, int(meta.get("table_version", version)), meta.get("method"), points)


def latest_map_version(store: StoreConfig, at_most: int) -> int | None:
    """The newest table version <= ``at_most`` that has a map (None: no map yet)."""
    prefix = f"{store.table}_map_v"
    tails = [n[len(prefix) :] for n in table_names(connect(store)) if n.startswith(prefix)]
    versions = [int(t) for t in tails if t.isdigit()]
    eligible = [v for v in versions if v <= at_most]
    return max(eligible) if eligible else None
