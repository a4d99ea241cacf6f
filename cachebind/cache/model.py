"""Cache-enhanced embeddings: retrieval (eq. 3) and blend (eq. 4) of ImageBind-LLM.

Given a query feature F_M, the cache returns its top-k neighbours among the cached image features
(S_topk = F_M · F_keyᵀ), and blends them back into the query as the authors' released code does::

    weights  = softmax(t · S_topk)
    F_cache  = normalize(weights · F_value)
    F~_M     = normalize((1 − alpha) · F_M + alpha · F_cache)

Keys and values are the same cached features. Released defaults: k = 10, t = 20, alpha = 0.5.
This runs on the serving hot path, so it is plain numpy: one index search for the whole batch,
one vector fetch for all distinct neighbours, then a few vectorised array operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cachebind.arrays import Floats, Ints

# Guards a division by a norm that is zero only for degenerate inputs (all-zero vectors).
_NORM_FLOOR = 1e-12


@runtime_checkable
class NeighbourIndex(Protocol):
    """What the cache needs from an index (``indexing.LoadedIndex`` has this shape)."""

    def search(
        self, queries: Floats, k: int, parts: Sequence[str | None] | None = None
    ) -> tuple[Floats, Ints]:
        """(scores float32 [n, k], ids int64 [n, k]); ids are -1 where fewer than k rows.
        ``parts``: the queries' modalities, for an index tuned per modality (None: unknown)."""
        ...


@runtime_checkable
class VectorSource(Protocol):
    """Where the exact cached vectors F_value come from (``CacheTable`` or the index itself)."""

    def vectors(self, ids: Sequence[int] | Ints) -> Floats:
        """float32 [len(ids), d], in the order asked."""
        ...


@dataclass(frozen=True)
class Enhanced:
    """One query's cache-enhanced embedding and the neighbours that made it.

    ``ids``, ``similarities`` (S_topk) and ``weights`` (softmax(t · S_topk)) list the neighbours
    found, best first; they are shorter than k when the cache holds fewer than k rows.
    """

    embedding: Floats  # F~_M, float32 [d], unit norm
    ids: Ints  # int64 [m]
    similarities: Floats  # float32 [m]
    weights: Floats  # float32 [m], sums to 1 (empty when m == 0)


def normalize(x: Floats, axis: int = -1) -> Floats:
    """L2-normalise along ``axis`` (float32)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    unit: Floats = x / np.maximum(norm, _NORM_FLOOR)
    return unit


def mix(embeddings: list[Floats], weights: list[float]) -> Floats:
    """Weighted mix of several inputs' features into one F_M.

    F_M = Σ (w_i / (Σw + 1e-6)) · normalize(e_i), deliberately *not* re-normalised afterwards
    (the released ``forward_visual`` searches and blends with the un-normalised mix). Each
    ``embeddings[i]`` is [d] or [n, d]; all must have the same shape.
    """
    if not embeddings:
        raise ValueError("mix needs at least one embedding")
    if len(embeddings) != len(weights):
        raise ValueError(f"{len(embeddings)} embeddings but {len(weights)} weights")
    shapes = {np.shape(e) for e in embeddings}
    if len(shapes) != 1:
        raise ValueError(f"embeddings to mix differ in shape: {sorted(shapes)}")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"mix weights must be finite and non-negative, got {list(weights)}")
    scale = w / (w.sum() + 1e-6)
    out = np.zeros(next(iter(shapes)), dtype=np.float32)
    for e, s in zip(embeddings, scale, strict=True):
        out += np.float32(s) * normalize(e)
    return out


def validate_params(k: int, t: float, alpha: float) -> None:
    """Raise ValueError naming the parameter when k, t or alpha is out of range."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"t (retrieval temperature) must be > 0, got {t!r}")
    if not np.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (cache weight) must be in [0, 1], got {alpha!r}")


def softmax_weights(similarities: Floats, t: float) -> Floats:
    """softmax(t · S_topk) over the last axis; -inf entries (padding) get weight 0.

    Rows with no finite entry get all-zero weights instead of NaN. The row's largest
    similarity is subtracted before scaling, in float64: ``t · S`` itself overflows float32
    for a large ``t`` (1e308 gave every weight 0), while ``t · (S - max) <= 0`` cannot.
    """
    s = np.asarray(similarities, dtype=np.float64)
    finite = np.isfinite(s)
    row_max = np.max(np.where(finite, s, -np.inf), axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.where(finite, (s - row_max) * float(t), -np.inf)
    e = np.exp(scaled).astype(np.float32)
    total = e.sum(axis=-1, keepdims=True)
    weights: Floats = e / np.where(total > 0, total, 1.0)
    return weights


def blend(
    f_m: Floats,
    neighbour_vectors: Floats,
    similarities: Floats,
    t: float,
    alpha: float,
) -> Floats:
    """Eq. 4 as released: F~_M = normalize((1 − alpha) · F_M + alpha · normalize(w · F_value)).

    ``f_m`` [n, d], ``neighbour_vectors`` [n, k, d], ``similarities`` [n, k] with -inf marking a
    padded (missing) neighbour. A query with no neighbour at all gets normalize(F_M).
    """
    f_m = np.asarray(f_m, dtype=np.float32)
    if f_m.ndim != 2:
        raise ValueError(f"f_m must be [n, d], got shape {f_m.shape}")
    values = np.asarray(neighbour_vectors, dtype=np.float32)
    if values.ndim != 3 or values.shape[0] != f_m.shape[0] or values.shape[2] != f_m.shape[1]:
        raise ValueError(f"neighbour_vectors must be [n, k, d]; got {values.shape} for {f_m.shape}")
    weights = softmax_weights(similarities, t)
    if weights.shape != values.shape[:2]:
        raise ValueError(f"similarities must be [n, k] = {values.shape[:2]}, got {weights.shape}")
    f_cache = normalize(np.einsum("nk,nkd->nd", weights, values))
    has_neighbours = weights.sum(axis=-1, keepdims=True) > 0
    a = np.where(has_neighbours, np.float32(alpha), np.float32(0.0))
    return normalize((1.0 - a) * f_m + a * f_cache)


class FaissNeighbours:
    """A plain FAISS index (such as the released ``knn.index``) as a NeighbourIndex + VectorSource.

    Values come from ``reconstruct_batch``, so the index must store its vectors exactly (Flat,
    or an ``IndexIDMap2`` over one) for F_value to be the cached features.
    """

    def __init__(self, index: Any) -> None:
        self.index = index
        self.dim = int(index.d)

    def search(
        self, queries: Floats, k: int, parts: Sequence[str | None] | None = None
    ) -> tuple[Floats, Ints]:
        # One setting for every query: a plain FAISS index carries no per-modality tuning.
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def vectors(self, ids: Sequence[int] | Ints) -> Floats:
        wanted = np.asarray(ids, dtype=np.int64)
        if wanted.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.index.reconstruct_batch(wanted), dtype=np.float32)


class CacheModel:
    """F_M -> F~_M through the feature cache.

    ``index`` finds S_topk; the exact F_value vectors come from ``table`` (the ``CacheTable``)
    when given, else from ``index.vectors`` (an index that also holds the vectors).
    """

    def __init__(self, index: NeighbourIndex, table: VectorSource | None = None) -> None:
        source = table if table is not None else index
        if not isinstance(source, VectorSource):
            raise TypeError(
                "CacheModel needs a table with .vectors(ids), or an index that has .vectors(ids)"
            )
        self.index = index
        self.values: VectorSource = source

    def neighbours(
        self, f_m: Floats, k: int, parts: Sequence[str | None] | None = None
    ) -> tuple[Floats, Ints, Floats]:
        """Retrieval (eq. 3) for a batch: (S_topk [n, k] with -inf padding, ids [n, k] with -1
        padding, F_value [n, k, d] with zero rows at padding). One search, one vector fetch;
        S_topk = F_M · F_value is computed from the exact values. ``parts``: the modalities of
        every query of the batch (the index searches them with the setting tuned for them)."""
        q = np.ascontiguousarray(f_m, dtype=np.float32)
        scores, ids = self.index.search(q, k, parts) if parts else self.index.search(q, k)
        scores = np.asarray(scores, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        valid = ids >= 0
        n, kk = ids.shape
        values = np.zeros((n, kk, f_m.shape[1]), dtype=np.float32)
        if valid.any():
            # Fetch each distinct neighbour once: in a batch of related queries many repeat.
            unique, inverse = np.unique(ids[valid], return_inverse=True)
            fetched = np.asarray(self.values.vectors(unique.tolist()), dtype=np.float32)
            if fetched.shape != (len(unique), f_m.shape[1]):
                raise ValueError(
                    f"vector source returned {fetched.shape} for {len(unique)} ids of dim "
                    f"{f_m.shape[1]}"
                )
            values[valid] = fetched[inverse]
            # S_topk from the exact values, not the index's scores: a compressed index (PQ)
            # ranks well but scores approximately, and the softmax weights are sensitive to it.
            scores = np.einsum("nkd,nd->nk", values, np.asarray(f_m, dtype=np.float32))
        return np.where(valid, scores, -np.inf).astype(np.float32), ids, values

    def enhance(
        self,
        f_m: Floats,
        k: int = 10,
        t: float = 20.0,
        alpha: float = 0.5,
        parts: Sequence[str | None] | None = None,
    ) -> list[Enhanced]:
        """Cache-enhanced embeddings F~_M for a batch of query features F_M [n, d] (or [d]);
        ``parts``: the modalities of every query of the batch (see :meth:`neighbours`)."""
        validate_params(k, t, alpha)
        f_m = np.asarray(f_m, dtype=np.float32)
        if f_m.ndim == 1:
            f_m = f_m[None, :]
        if f_m.ndim != 2 or f_m.shape[0] == 0:
            raise ValueError(f"f_m must be a non-empty [n, d] array, got shape {f_m.shape}")
        if not np.all(np.isfinite(f_m)):
            raise ValueError("f_m contains NaN or infinite values")
        sims, ids, values = self.neighbours(f_m, k, parts)
        enhanced = blend(f_m, values, sims, t, alpha)
        weights = softmax_weights(sims, t)
        out = []
        for i in range(f_m.shape[0]):
            keep = ids[i] >= 0
            out.append(
                Enhanced(
                    embedding=enhanced[i],
                    ids=ids[i][keep],
                    similarities=sims[i][keep],
                    weights=weights[i][keep],
                )
            )
        return out
