"""A 2-D map of the collection: a layout fitted on a sample, every row placed by it.

UMAP (umap-learn 0.5, cosine metric) or PCA is fitted on ``analysis.map_sample`` rows; the
whole table is then transformed batch by batch, so memory follows the sample and the batch,
not the table. The positions are stored as the table ``<table>_map_v<version>``: one map per
images-table version, whose metadata records the method, sample and seed.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from cachebind.analysis.labelling import open_side_table, table_names
from cachebind.analysis.sampling import sample_images
from cachebind.config import Settings, StoreConfig
from cachebind.store import CacheTable, connect
from cachebind.store.table import vectors_to_numpy

METADATA_KEY = b"cachebind_map"
MAP_SCHEMA_FIELDS = [
    pa.field("id", pa.int64(), nullable=False),
    pa.field("x", pa.float32(), nullable=False),
    pa.field("y", pa.float32(), nullable=False),
]


def map_table_name(table: str, version: int) -> str:
    return f"{table}_map_v{version}"


class Projection:
    """A fitted 2-D layout: ``transform(vectors [n, d]) -> [n, 2]``."""

    def __init__(self, method: str, model: Any, mean: np.ndarray | None = None) -> None:
        self.method = method
        self.model = model
        self.mean = mean

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        if self.method == "pca":
            return ((vectors - self.mean) @ self.model).astype(np.float32)
        return np.asarray(self.model.transform(vectors), dtype=np.float32)


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


@dataclass
class MapResult:
    name: str
    table_version: int
    method: str
    rows: int
    sample: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compute_map(settings: Settings, method: Literal["umap", "pca"] | None = None) -> MapResult:
    """Fit the layout on a sample of the pinned table version, place every row, store it."""
    started = time.perf_counter()
    cfg = settings.analysis
    method = method or cfg.map_method
    table = CacheTable.open(settings.store)
    positions, sample = sample_images(table, cfg.map_sample, cfg.seed)
    projection = fit_projection(sample, method, cfg.map_neighbours, cfg.seed)
    name = map_table_name(settings.store.table, table.version)
    meta = {
        "method": projection.method,
        "table_version": table.version,
        "sample": int(len(positions)),
        "seed": cfg.seed,
    }
    schema = pa.schema(MAP_SCHEMA_FIELDS, metadata={METADATA_KEY: json.dumps(meta)})
    rows = 0

    def placed() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for batch in table.dataset.to_batches(columns=["id", "vector"], batch_size=cfg.batch_rows):
            xy = projection.transform(vectors_to_numpy(batch.column("vector")))
            rows += batch.num_rows
            yield pa.RecordBatch.from_arrays(
                [batch.column("id"), pa.array(xy[:, 0]), pa.array(xy[:, 1])], schema=schema
            )

    # One streamed write, one commit: a reader sees the previous map or the whole new one,
    # and memory holds one batch.
    reader = pa.RecordBatchReader.from_batches(schema, placed())
    connect(settings.store).create_table(name, reader, schema=schema, mode="overwrite")
    seconds = time.perf_counter() - started
    return MapResult(name, table.version, projection.method, rows, len(positions), seconds)


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
