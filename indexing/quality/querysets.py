"""The query sets an index is tuned and verified on, one per kind of query it serves.

Cross-modal queries do not come from the image rows' distribution: in an ImageBind space each
modality sits in its own cone, a text query's true image neighbours are at cosine ~0.2-0.35
where an image's are at ~0.6-0.9 ("Mind the Gap", Liang et al. 2022), so an index tuned on held
out image rows misses far more of a text query's neighbours. A build therefore gathers:

* ``image:held_out``: table rows sampled with a fixed seed and kept out of training;
* ``text:captions``: the caption embeddings stored beside the image vectors (``text_vector``,
  ``cachebind embed --caption-embeddings``), when the table has them;
* ``<modality>:query_log``: the embeddings F_M the service answered
  (:mod:`cachebind.published.querylog`);
* ``<modality>:file:<basename>``: query embeddings a user supplies (``--queries text=q.npy``).

Each set is at most ``IndexConfig.max_queries_per_set`` queries (a seeded uniform sample); a set
with fewer than ``min_queries_per_set`` is measured and reported but marked untrusted and does
not steer tuning (its recall's sampling error is too wide to stand behind).

A query that is itself a table row (a held-out image) or is paired with one (a caption and its
image) carries that row's position: recall is counted without it, on both the exact and the
approximate side (leave-one-out). A new text query has no such twin in the cache, and a
caption's own image would be an easy rank-1 hit that says nothing about the text queries the
service will see, so it is left out, like a held-out row's own row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cachebind.errors import InputError
from cachebind.published.querylog import MODALITY_RE, load_query_sets
from cachebind.store.table import vectors_to_numpy

log = logging.getLogger(__name__)

HELD_OUT = "held_out_rows"
CAPTIONS = "captions"
QUERY_LOG = "query_log"
FILE = "file"
VECTOR_COLUMNS = ("vector", "embedding")
"""Column names a parquet or Lance query file may keep its embeddings in."""
MAX_QUERY_FILE_BYTES = 2 * 2**30


@dataclass
class QuerySet:
    """One kind of query: its embeddings and each one's own table row (-1: none)."""

    name: str
    modality: str
    source: str
    queries: np.ndarray
    self_positions: np.ndarray
    trusted: bool = True

    def __len__(self) -> int:
        return len(self.queries)


def _sample(n: int, size: int, seed: int) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def held_out_positions(n: int, size: int, seed: int) -> np.ndarray:
    """Positions of the held-out image rows of an ``n``-row table (all of a tiny table but one)."""
    size = min(size, n) if n > 1 else 0
    if size == 0:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False)).astype(np.int64)


def caption_set(dataset: Any, size: int, seed: int) -> QuerySet | None:
    """``text:captions``: up to ``size`` non-null ``text_vector``s of the table, None without."""
    if "text_vector" not in dataset.schema.names:
        return None
    n = dataset.count_rows()
    # Over-sample: rows whose caption could not be embedded have a null text_vector.
    positions = _sample(n, min(n, 2 * size), seed).astype(np.int64)
    if len(positions) == 0:
        return None
    column = dataset.take(positions.tolist(), columns=["text_vector"]).column("text_vector")
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = np.asarray(column.is_valid())
    if not valid.any():
        return None
    vectors = vectors_to_numpy(column.filter(pa.array(valid)))
    positions = positions[valid]
    finite = np.isfinite(vectors).all(1) & (np.abs(vectors).sum(1) > 0)
    vectors, positions = vectors[finite], positions[finite]
    keep = _sample(len(positions), size, seed + 1)
    return QuerySet(
        "text:captions", "text", CAPTIONS, np.ascontiguousarray(vectors[keep]), positions[keep]
    )


def log_sets(index_dir: Path, dim: int, size: int, seed: int) -> list[QuerySet]:
    """``<modality>:query_log`` for each modality in the index directory's query log."""
    out = []
    for modality, rows in sorted(load_query_sets(index_dir).items()):
        if rows.shape[1] != dim:
            log.warning(
                "query log: %s embeddings are %d-d, the table %d-d; not used",
                modality,
                rows.shape[1],
                dim,
            )
            continue
        keep = _sample(len(rows), size, seed)
        out.append(
            QuerySet(
                f"{modality}:query_log",
                modality,
                QUERY_LOG,
                np.ascontiguousarray(rows[keep]),
                np.full(len(keep), -1, np.int64),
            )
        )
    return out


def parse_query_spec(spec: str) -> tuple[str, Path]:
    """``"text=/path/q.npy"`` -> ("text", Path); InputError naming what is wrong."""
    modality, sep, path = spec.partition("=")
    modality = modality.strip()
    if not sep or not path.strip():
        raise InputError("--queries", "wrong_type", f"expected MODALITY=PATH, got {spec!r}")
    if not MODALITY_RE.match(modality):
        raise InputError("--queries", "wrong_type", f"{modality!r} is not a modality name")
    return modality, Path(path.strip())


def _column_of(table: pa.Table, path: Path) -> pa.Array:
    for name in VECTOR_COLUMNS:
        if name in table.column_names:
            column = table.column(name).combine_chunks()
            break
    else:
        raise ValueError(
            f"{path}: no column named {' or '.join(VECTOR_COLUMNS)} "
            f"(columns: {', '.join(table.column_names[:10])})"
        )
    if not pa.types.is_fixed_size_list(column.type) and not pa.types.is_list(column.type):
        raise ValueError(f"{path}: column {name!r} is {column.type}, not a list of numbers")
    if not pa.types.is_floating(column.type.value_type) and not pa.types.is_integer(
        column.type.value_type
    ):
        raise ValueError(f"{path}: column {name!r} holds {column.type.value_type}, not numbers")
    if column.null_count:
        raise ValueError(f"{path}: column {name!r} has {column.null_count} null rows")
    return column


def _list_to_numpy(column: pa.Array, path: Path) -> np.ndarray:
    if pa.types.is_fixed_size_list(column.type):
        return vectors_to_numpy(column)
    lengths = np.asarray(column.value_lengths())
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError(f"{path}: rows of different lengths ({lengths.min()}..{lengths.max()})")
    width = int(lengths[0]) if len(lengths) else 0
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(-1, width) if width else np.zeros((0, 0), np.float32)


def read_query_file(path: Path, dim: int) -> np.ndarray:
    """Query embeddings float32 [n, ``dim``] from a .npy, parquet or Lance file.

    InputError (a ValueError naming the file) for anything else: a missing file, another shape
    or dimension, non-numeric, null, NaN or infinite values, an empty file.
    """
    try:
        return _read_query_file(Path(path), dim)
    except ValueError as e:
        raise InputError("--queries", "invalid_queries", str(e)) from e


def _read_query_file(path: Path, dim: int) -> np.ndarray:
    if not path.exists():
        raise ValueError(f"query file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            if path.stat().st_size > MAX_QUERY_FILE_BYTES:
                raise ValueError(f"{path}: larger than {MAX_QUERY_FILE_BYTES >> 30} GiB")
            x = np.load(path, allow_pickle=False)
        elif suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            x = _list_to_numpy(_column_of(pq.read_table(path), path), path)
        elif suffix == ".lance" or (path / "_versions").is_dir():
            import lance

            x = _list_to_numpy(_column_of(lance.dataset(str(path)).to_table(), path), path)
        else:
            raise ValueError(f"{path}: not a .npy, .parquet or Lance file")
    except Exception as e:  # a truncated npy, a parquet that is not one: the file's fault
        if isinstance(e, ValueError) and str(path) in str(e):
            raise  # one of ours, already naming the file
        raise ValueError(f"{path}: cannot be read as query embeddings ({e})") from e
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{path}: holds {x.dtype}, not numbers")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{path}: shape {tuple(x.shape)}, the table's vectors are [n, {dim}]")
    if len(x) == 0:
        raise ValueError(f"{path}: no queries")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} rows hold NaN or infinite values")
    return x


def file_set(modality: str, path: Path, dim: int, size: int, seed: int) -> QuerySet:
    """``<modality>:file:<basename>`` from a user's query file (see :func:`read_query_file`)."""
    x = read_query_file(path, dim)
    keep = _sample(len(x), size, seed)
    return QuerySet(
        f"{modality}:file:{Path(path).name}",
        modality,
        FILE,
        np.ascontiguousarray(x[keep]),
        np.full(len(keep), -1, np.int64),
    )


def mark_trust(sets: list[QuerySet], min_queries: int) -> list[QuerySet]:
    """Flag the sets too small to trust; none is dropped."""
    for s in sets:
        s.trusted = len(s) >= min_queries
        if not s.trusted:
            log.warning(
                "query set %s has %d queries (< %d): reported, but untrusted and not tuned on",
                s.name,
                len(s),
                min_queries,
            )
    return sets


def deciding(sets: list[QuerySet]) -> list[int]:
    """Indices of the sets that decide tuning: the trusted ones (all of them if none is)."""
    trusted = [i for i, s in enumerate(sets) if s.trusted and len(s)]
    return trusted or [i for i, s in enumerate(sets) if len(s)]


def unique_names(sets: list[QuerySet]) -> list[QuerySet]:
    """Two files of the same basename get ``#2``, ``#3`` … so each set keeps its own line."""
    seen: dict[str, int] = {}
    for s in sets:
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"
    return sets
