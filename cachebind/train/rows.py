"""Reading cache rows by offset through Ray Data, for the training workers.

A worker's offsets for an epoch (``data.worker_offsets``) become a Ray Data dataset whose
``map_batches`` takes the rows from the table's Lance dataset at its pinned version: reads run
in Ray tasks ahead of the training loop, and ``preserve_order`` keeps the schedule's order.
This module imports neither torch nor cachebind's model code, so a read task starts quickly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

_DATASETS: dict[tuple[str, int], Any] = {}


def _lance_dataset(uri: str, version: int, storage_options: dict[str, str] | None) -> Any:
    """One open Lance dataset per process and (uri, version): opening costs a manifest read."""
    key = (uri, version)
    if key not in _DATASETS:
        import lance

        _DATASETS[key] = lance.dataset(uri, version=version, storage_options=storage_options)
    return _DATASETS[key]


@dataclass(frozen=True)
class RowSource:
    """Where a worker reads rows: the table's Lance dataset at a pinned version."""

    uri: str
    version: int
    storage_options: dict[str, str] | None = None
    columns: tuple[str, ...] = ("vector", "caption")

    def take(self, offsets: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``offsets``, in that order, as numpy columns (vectors float32 [n, d])."""
        table = _lance_dataset(self.uri, self.version, self.storage_options).take(
            np.asarray(offsets, dtype=np.int64).tolist(), columns=list(self.columns)
        )
        out: dict[str, np.ndarray] = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            if name == "vector":
                values = column.flatten().to_numpy(zero_copy_only=False)
                out[name] = values.astype(np.float32).reshape(-1, column.type.list_size)
            else:
                out[name] = np.asarray(column.to_pylist(), dtype=object)
        return out


def _take(source: RowSource, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return source.take(batch["data"])


def stream_rows(
    source: RowSource, offsets: np.ndarray, micro_batch: int, data_cpus: float = 0.25
) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches of the rows at ``offsets``, in that order, read ahead by Ray Data."""
    import ray.data

    if len(offsets) == 0:
        return iter(())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order is the schedule: keep it
    ctx.enable_progress_bars = False  # one bar per epoch per worker would drown the trainer's
    ds = ray.data.from_numpy(np.asarray(offsets, dtype=np.int64)).map_batches(
        functools.partial(_take, source),
        batch_size=micro_batch,
        batch_format="numpy",
        num_cpus=data_cpus,
    )
    return ds.iter_batches(batch_size=micro_batch, batch_format="numpy", prefetch_batches=2)
