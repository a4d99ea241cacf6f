"""Reading table rows into an index: what a build carries between its steps, shared by the
single build (:mod:`indexing.steps.build`), the Ray shards (:mod:`indexing.steps.shards`) and an
incremental add (:mod:`indexing.steps.add`). A leaf module: it knows the table and FAISS, none of
its callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from cachebind.config import IndexConfig
from cachebind.store import CacheTable
from cachebind.store.table import vectors_to_numpy
from indexing.quality.querysets import QuerySet
from indexing.quality.recall import ExactTopK

READ_BATCH = 32_768


@dataclass
class Work:
    """What a build carries from step to step.

    ``sets``: the query sets tuned and measured on (held-out rows, captions, the query log,
    files); ``queries`` / ``query_positions`` are all their queries stacked, in ``sets`` order,
    with each query's own table position (-1: not a table row), and ``exact`` their exact top-k
    over the table, filled as the rows stream in. ``held_out`` are the positions kept out of the
    training sample.
    """

    table: CacheTable
    config: IndexConfig
    n: int
    dim: int
    sets: list[QuerySet]
    held_out: np.ndarray
    exact: ExactTopK
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def queries(self) -> np.ndarray:
        return self.exact.queries

    @property
    def query_positions(self) -> np.ndarray:
        if not self.sets:
            return np.zeros(0, np.int64)
        return np.concatenate([s.self_positions for s in self.sets])


def read_positions(dataset: Any, positions: np.ndarray, column: str) -> np.ndarray:
    """Vectors (float32) of the rows at ``positions`` (sorted), in that order."""
    out = []
    for s in range(0, len(positions), READ_BATCH):
        chunk = dataset.take(positions[s : s + READ_BATCH].tolist(), columns=[column])
        out.append(vectors_to_numpy(chunk.column(column)))
    if not out:
        return np.zeros((0, dataset.schema.field(column).type.list_size), np.float32)
    return np.ascontiguousarray(np.concatenate(out))


def add_range(
    index: faiss.Index | None,
    dataset: Any,
    start: int,
    stop: int,
    exact: ExactTopK | None,
    *,
    add_from: int = 0,
    progress: bool = False,
    desc: str = "adding",
    column: str,
) -> np.ndarray:
    """Stream rows [start, stop) in table order: add those at ``>= add_from`` to ``index``,
    feed all to the exact ground truth; return the ids of the rows read. ``column``: the
    table's vector column the index holds (``CacheTable.column``)."""
    ids = []
    bar = tqdm(total=stop - start, desc=desc, unit="row", disable=not progress, leave=False)
    position = start
    for batch in dataset.to_batches(
        columns=["id", column], offset=start, limit=stop - start, batch_size=READ_BATCH
    ):
        if batch.num_rows == 0:
            continue
        x = np.ascontiguousarray(vectors_to_numpy(batch.column(column)))
        if index is not None and position + len(x) > add_from:
            index.add(x[max(0, add_from - position) :])
        if exact is not None:
            exact.add(x, position)
        ids.append(batch.column("id").to_numpy())
        position += len(x)
        bar.update(len(x))
    bar.close()
    if position != stop:
        raise RuntimeError(f"read {position - start} rows of [{start}, {stop}): table changed?")
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)
