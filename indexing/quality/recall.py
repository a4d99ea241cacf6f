"""Exact ground truth and recall on held-out queries.

The queries are table rows that were left out of the training sample. Each one is also in the
index (it is a cached row), so its own row would be a free rank-1 hit: both the exact and the
approximate result lists drop the query's own position before recall is counted
("leave-one-out"), which makes recall@1 as hard as it is for a new query.
"""

from __future__ import annotations

import faiss
import numpy as np


class ExactTopK:
    """Exact top-``k`` inner-product neighbours of ``queries`` over vectors seen in batches.

    Streaming (a heap per query), so the ground truth of a 100M-row table never needs the whole
    matrix in memory, and per-shard results can be merged (:meth:`merge`).
    """

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.positions = np.full((len(queries), k), -1, dtype=np.int64)

    def add(self, vectors: np.ndarray, first_position: int) -> None:
        if len(self.queries) == 0 or len(vectors) == 0:
            return
        kk = min(self.k, len(vectors))
        scores, pos = faiss.knn(self.queries, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
        self._merge(scores, pos + first_position)

    def merge(self, other: ExactTopK) -> None:
        self._merge(other.scores, other.positions)

    def _merge(self, scores: np.ndarray, positions: np.ndarray) -> None:
        allD = np.concatenate([self.scores, scores], axis=1)
        allI = np.concatenate([self.positions, positions], axis=1)
        # Stable sort on -score, ties broken by position, so shard order never changes results.
        order = np.lexsort((allI, -allD), axis=1)[:, : self.k]
        self.scores = np.take_along_axis(allD, order, axis=1)
        self.positions = np.take_along_axis(allI, order, axis=1)


def drop_self(found: np.ndarray, self_positions: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` results of each row of ``found`` that are not the query's own position."""
    keep = found != self_positions[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(found, order, axis=1)
    kept = np.take_along_axis(keep, order, axis=1)
    return np.where(kept, out, -1)


def per_query_recall(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """|found[i, :k] ∩ truth[i, :k]| / |truth[i, :k]| for each query (-1 pads in truth ignored)."""
    f, t = found[:, :k], truth[:, :k]
    valid = t >= 0
    hits = ((f[:, :, None] == t[:, None, :]) & valid[:, None, :] & (f >= 0)[:, :, None]).any(1)
    return hits.sum(1) / np.maximum(valid.sum(1), 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean k-recall@k over the queries: |found ∩ truth| / k, the usual ANN recall."""
    if len(truth) == 0:
        return float("nan")
    return float(per_query_recall(found, truth, k).mean())
