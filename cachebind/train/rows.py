"""Reading cache rows by offset through Ray Data, for the training workers.

A worker's offsets for an epoch (``data.worker_offsets``) become a Ray Data dataset whose
``map_batches`` takes the rows from the table's Lance dataset at its pinned version: reads run
in Ray tasks ahead of the training loop, and ``preserve_order`` keeps the schedule's order.
This module imports neither torch nor cachebind's model code, so a read task starts quickly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

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
    views: int = 0
    """Augmented views to draw F_M from (the table's ``view_vectors``); 0: ``vector`` only."""

    def take(self, offsets: np.ndarray, choices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The rows at ``offsets``, in that order, as numpy columns (vectors float32 [n, d],
        other fixed-size lists such as ``patch_tokens`` [n, size] in their dtype).
        With ``choices`` (``data.view_choices``, one per offset) ``vector`` holds, per row, the
        centre vector (0) or view k of ``view_vectors`` (k)."""
        views = self.views and choices is not None
        columns = [*self.columns, "view_vectors"] if views else list(self.columns)
        table = _lance_dataset(self.uri, self.version, self.storage_options).take(
            np.asarray(offsets, dtype=np.int64).tolist(), columns=columns
        )
        out: dict[str, np.ndarray] = {}
        for name in self.columns:
            column = table.column(name).combine_chunks()
            if name == "vector":
                out[name] = _vectors(column)
            elif hasattr(column.type, "list_size"):  # patch tokens: [n, patches · width]
                out[name] = _fixed_rows(column)
            else:
                out[name] = np.asarray(column.to_pylist(), dtype=object)
        if views:
            assert choices is not None
            picked = np.asarray(choices, dtype=np.int64)
            rows = np.flatnonzero(picked > 0)
            if len(rows):
                flat = _vectors(table.column("view_vectors").combine_chunks())  # [n, N · d]
                all_views = flat.reshape(len(picked), self.views, -1)
                out["vector"][rows] = all_views[rows, picked[rows] - 1]
        return out


def _vectors(column: Any) -> np.ndarray:
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32).reshape(-1, column.type.list_size)


def _fixed_rows(column: Any) -> np.ndarray:
    """A fixed-size-list column as [n, size] in its own dtype (float16 tokens stay float16)."""
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)


def _take(source: RowSource, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    data = batch["data"]
    if data.ndim == 2:  # (offset, view choice) pairs
        return source.take(data[:, 0], data[:, 1])
    return source.take(data)


def stream_rows(
    source: RowSource,
    offsets: np.ndarray,
    micro_batch: int,
    data_cpus: float = 0.25,
    choices: np.ndarray | None = None,
) -> Iterable[dict[str, np.ndarray]]:
    """Micro-batches of the rows at ``offsets``, in that order, read ahead by Ray Data (with
    ``choices``, each row's F_M is the view chosen for it, ``RowSource.take``)."""
    import ray.data

    if len(offsets) == 0:
        return iter(())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order is the schedule: keep it
    ctx.enable_progress_bars = False  # one bar per epoch per worker would drown the trainer's
    items = np.asarray(offsets, dtype=np.int64)
    if choices is not None:
        items = np.stack([items, np.asarray(choices, dtype=np.int64)], axis=1)
    ds = ray.data.from_numpy(items).map_batches(
        functools.partial(_take, source),
        batch_size=micro_batch,
        batch_format="numpy",
        num_cpus=data_cpus,
    )
    batches = ds.iter_batches(batch_size=micro_batch, batch_format="numpy", prefetch_batches=2)
    return cast(Iterable[dict[str, np.ndarray]], batches)  # what batch_format="numpy" gives
