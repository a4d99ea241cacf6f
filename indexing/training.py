"""Train a new index of a selected key on a sample of the table's rows (never the held-out ones)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import faiss
import numpy as np
from tqdm.auto import tqdm

from indexing.faiss_ops import new_index
from indexing.prepare import SEED
from indexing.rows import Work, read_positions
from indexing.select import Selection

log = logging.getLogger(__name__)

KMEANS_ITERATIONS = 10


def train_index(work: Work, selection: Selection, progress: bool) -> faiss.Index:
    index = new_index(work.dim, selection.key)
    if selection.train_size and not index.is_trained:
        rng = np.random.default_rng(SEED + 1)
        pool = np.setdiff1d(np.arange(work.n), work.held_out, assume_unique=True)
        if len(pool) < selection.train_size:
            # A small table is mostly held-out queries: train on every row rather than on too
            # few (k-means needs at least one point per list).
            pool = np.arange(work.n)
        size = min(selection.train_size, len(pool))
        positions = np.sort(rng.choice(pool, size, replace=False))
        t0 = time.perf_counter()
        xt = read_positions(work.table.dataset, positions, work.table.column)
        log.info("training %s on %d vectors", selection.key, len(xt))
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            # 10 k-means iterations instead of 25: the centroids only route the search (the
            # tuner picks nprobe on the result) and k-means is most of a CPU build's time.
            ivf.cp.niter = KMEANS_ITERATIONS
        with tqdm(total=1, desc=f"training {selection.key}", disable=not progress, leave=False):
            index.train(xt)
        work.timings["train_s"] = work.timings.get("train_s", 0.0) + time.perf_counter() - t0
    return index


def search_fn(index: faiss.Index) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(np.ascontiguousarray(q, dtype=np.float32), k)

    return search
