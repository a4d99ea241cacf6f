"""Seeded samples of a table's image rows, by position in one pinned version."""

from __future__ import annotations

import numpy as np

from cachebind.store import CacheTable
from cachebind.store.table import vectors_to_numpy


def sample_positions(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a uniform sample of ``size`` among ``n`` rows (all when fewer)."""
    if n <= size:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size, replace=False)).astype(np.int64)


def vectors_at(table: CacheTable, positions: np.ndarray) -> np.ndarray:
    """float32 ``[len(positions), d]`` of the rows at ``positions`` (any order)."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) == 0:
        return np.zeros((0, table.dim), dtype=np.float32)
    taken = table.dataset.take(positions.tolist(), columns=["vector"])
    return vectors_to_numpy(taken["vector"])


def sample_images(table: CacheTable, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, vectors) of a seeded sample of ``size`` image rows."""
    positions = sample_positions(table.count(), size, seed)
    return positions, vectors_at(table, positions)
