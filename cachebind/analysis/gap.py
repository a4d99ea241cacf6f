"""The modality gap, measured: how far each query set sits from the image rows, before and
after the cache blend (ImageBind-LLM eq. 4).

For a query set Q (unit rows) and the image rows I: the gap vector is centroid(Q) - centroid(I)
and its norm the centroid distance ("Mind the Gap", Liang et al. 2022); each query's top-1
similarity is its highest cosine to an image row; where a query has a paired image (a caption
and its picture), the cosine between the two. The same numbers are then taken on the blended
queries F~ = normalize((1 - alpha) F + alpha normalize(softmax(t S_topk) F_value)), with the k
neighbours retrieved exactly among the image rows measured (a query's own paired image left
out, as the index's recall measurement does), which is the paper's claim that the cache moves
other modalities towards the images, measured on the user's collection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cachebind.cache.model import blend, normalize

QUERY_BATCH = 256
"""Queries scored at a time: the [batch, images] similarity matrix bounds memory."""


@dataclass
class QueryGroup:
    """One query set: its embeddings and, per query, its paired image row (-1: none)."""

    name: str
    modality: str
    queries: np.ndarray
    pair_positions: np.ndarray | None = None
    """Table row positions of the paired images (-1 where a query has none)."""
    paired: np.ndarray | None = None
    """The paired images' vectors ``[n, d]`` (rows of queries without a pair are ignored)."""


@dataclass
class GapStats:
    centroid_distance: float
    gap_vector: np.ndarray
    top1: np.ndarray
    """Each query's highest cosine to an image row."""
    paired: np.ndarray
    """Each paired query's cosine to its own image (empty without pairs)."""

    def summary(self) -> dict[str, Any]:
        return {
            "centroid_distance": self.centroid_distance,
            "gap_vector_norm": float(np.linalg.norm(self.gap_vector)),
            "top1": describe(self.top1),
            "paired_cosine": describe(self.paired),
        }


@dataclass
class GapResult:
    name: str
    modality: str
    queries: int
    before: GapStats
    after: GapStats
    params: dict[str, float] = field(default_factory=dict)
    queries_before: np.ndarray | None = field(default=None, repr=False)
    queries_after: np.ndarray | None = field(default=None, repr=False)
    """The unit queries and their blends, for the report's projection plot."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modality": self.modality,
            "queries": self.queries,
            "blend": self.params,
            "before": self.before.summary(),
            "after": self.after.summary(),
            "gap_vector_before": self.before.gap_vector.tolist(),
            "gap_vector_after": self.after.gap_vector.tolist(),
        }


def describe(x: np.ndarray) -> dict[str, float] | None:
    """count, mean, std and the quantiles of a distribution (None when empty)."""
    if len(x) == 0:
        return None
    q = np.quantile(x, [0.1, 0.5, 0.9])
    return {
        "count": int(len(x)),
        "mean": float(np.mean(x)),
        "std": float(np.std(x)),
        "p10": float(q[0]),
        "median": float(q[1]),
        "p90": float(q[2]),
    }


def gap_stats(
    queries: np.ndarray, images: np.ndarray, paired: np.ndarray | None, has_pair: np.ndarray
) -> GapStats:
    """The numbers of one set of unit queries against unit image rows."""
    gap = queries.astype(np.float64).mean(0) - images.astype(np.float64).mean(0)
    top1 = (
        np.concatenate(
            [
                (queries[i : i + QUERY_BATCH] @ images.T).max(axis=1)
                for i in range(0, len(queries), QUERY_BATCH)
            ]
        )
        if len(queries)
        else np.zeros(0, np.float32)
    )
    pair_cos = (
        np.einsum("nd,nd->n", queries[has_pair], paired[has_pair])
        if paired is not None and has_pair.any()
        else np.zeros(0, np.float32)
    )
    return GapStats(float(np.linalg.norm(gap)), gap, top1.astype(np.float32), pair_cos)


def blend_queries(
    queries: np.ndarray,
    images: np.ndarray,
    k: int,
    t: float,
    alpha: float,
    image_positions: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Eq. 4 for every query with its top-k found exactly among ``images``; a query's
    ``exclude`` position (its paired image's table position, -1: none) is not retrieved."""
    k = min(k, len(images))
    out = np.empty_like(queries, dtype=np.float32)
    for i in range(0, len(queries), QUERY_BATCH):
        q = queries[i : i + QUERY_BATCH]
        sims = q @ images.T
        if exclude is not None and image_positions is not None:
            own = image_positions[None, :] == exclude[i : i + QUERY_BATCH, None]
            sims = np.where(own, -np.inf, sims)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        out[i : i + len(q)] = blend(q, images[top], top_sims, t, alpha)
    return out


def measure_gap(
    groups: list[QueryGroup],
    images: np.ndarray,
    *,
    k: int,
    t: float,
    alpha: float,
    image_positions: np.ndarray | None = None,
) -> list[GapResult]:
    """Before/after numbers of every query set against ``images`` (rows normalised here)."""
    images = normalize(images)
    results = []
    for group in groups:
        queries = normalize(group.queries)
        n = len(queries)
        positions = (
            group.pair_positions if group.pair_positions is not None else np.full(n, -1, np.int64)
        )
        has_pair = positions >= 0
        paired = normalize(group.paired) if group.paired is not None else None
        after = blend_queries(queries, images, k, t, alpha, image_positions, positions)
        results.append(
            GapResult(
                group.name,
                group.modality,
                n,
                gap_stats(queries, images, paired, has_pair),
                gap_stats(after, images, paired, has_pair),
                {"k": k, "t": t, "alpha": alpha},
                queries,
                after,
            )
        )
    return results
