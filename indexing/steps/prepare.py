"""What a build works on: its query sets, their exact top-k, and the sample the index is fitted
on.

The query sets (:mod:`indexing.quality.querysets`): ``N_QUERIES`` table rows sampled with a fixed
seed and kept out of the training sample, the table's caption embeddings, the service's query log
and the caller's query files. Their exact top-100 (:class:`indexing.quality.recall.ExactTopK`) is
filled while the rows stream into the index, so the table is read once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from cachebind.config import IndexConfig
from cachebind.store import CacheTable
from indexing.mechanics.faiss_ops import new_index
from indexing.mechanics.fit import fit_index
from indexing.quality.measure import RECALL_KS
from indexing.quality.querysets import (
    FILE,
    HELD_OUT,
    QuerySet,
    caption_set,
    file_set,
    held_out_positions,
    log_sets,
    mark_trust,
    unique_names,
)
from indexing.quality.recall import ExactTopK
from indexing.steps.rows import Work, read_positions
from indexing.steps.select import Selection

log = logging.getLogger(__name__)

N_QUERIES = 1000
"""Held-out queries for tuning and recall: enough for +-1% on recall@10."""
SEED = 0
QueryFiles = Sequence[tuple[str, Path]]
"""``[(modality, path)]``: the caller's query files (``--queries text=q.npy``)."""


def gather_sets(
    table: CacheTable,
    config: IndexConfig,
    queries: np.ndarray | None = None,
    query_files: QueryFiles | None = None,
) -> tuple[list[QuerySet], np.ndarray]:
    """(query sets, held-out positions) for a build of ``table`` (see
    :mod:`indexing.quality.querysets`).

    ``queries``: the caller's own held-out queries, instead of sampled table rows.
    """
    n, dim = table.count(), table.dim
    size = config.max_queries_per_set
    sets: list[QuerySet] = []
    held = np.zeros(0, np.int64)
    if queries is not None:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        sets.append(
            QuerySet("image:file:caller-supplied", "image", FILE, q, np.full(len(q), -1, np.int64))
        )
    else:
        held = held_out_positions(n, min(N_QUERIES, size), SEED)
        if len(held):
            rows = read_positions(table.dataset, held, table.column)
            sets.append(QuerySet("image:held_out", "image", HELD_OUT, rows, held))
    # Captions and logged queries are ImageBind's embeddings: no queries of another column.
    imagebind = table.column == "vector"
    if config.caption_queries and imagebind:
        captions = caption_set(table.dataset, size, SEED + 2)
        if captions is not None:
            sets.append(captions)
    if config.query_log and imagebind:
        sets.extend(log_sets(config.dir, dim, size, SEED + 3))
    for modality, path in query_files or []:
        sets.append(file_set(modality, path, dim, size, SEED + 4))
    return unique_names(mark_trust(sets, config.min_queries_per_set)), held


def prepare_work(
    table: CacheTable,
    config: IndexConfig,
    queries: np.ndarray | None,
    query_files: QueryFiles | None = None,
) -> Work:
    n, dim = table.count(), table.dim
    if n == 0:
        raise ValueError("the table is empty: nothing to index")
    sets, held = gather_sets(table, config, queries, query_files)
    stacked = (
        np.ascontiguousarray(np.concatenate([s.queries for s in sets]))
        if sets
        else np.zeros((0, dim), np.float32)
    )
    k_truth = min(max(RECALL_KS), n - 1) + 1  # +1: room for the query's own row
    for s in sets:
        log.info("query set %s: %d queries%s", s.name, len(s), "" if s.trusted else " (untrusted)")
    return Work(table, config, n, dim, sets, held, ExactTopK(stacked, k_truth))


def fit_on_sample(work: Work, selection: Selection, progress: bool) -> faiss.Index:
    """A new index of the selected key, fitted on a sample of the table's rows (never the
    held-out ones)."""
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
        fit_index(index, selection.key, xt, progress)
        work.timings["train_s"] = work.timings.get("train_s", 0.0) + time.perf_counter() - t0
    return index
