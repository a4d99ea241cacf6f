"""Recall and latency of a tuned index, per query set: what the manifest reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from indexing.quality.querysets import QuerySet
from indexing.quality.tune import (
    CONFIDENCE_Z,
    Groups,
    SearchFn,
    batch1_p50_ms,
    leave_one_out_recall,
)

RECALL_KS = (1, 10, 100)


def groups_of(sets: list[QuerySet], deciding: list[int]) -> Groups:
    slices, start = [], 0
    for s in sets:
        slices.append(slice(start, start + len(s)))
        start += len(s)
    return Groups([s.name for s in sets], slices, deciding)


def batch64_ms_per_query(search: SearchFn, queries: np.ndarray, k: int, batches: int = 4) -> float:
    """Wall time per query of searching batches of 64 (the best of ``batches`` timed)."""
    if len(queries) == 0:
        return float("nan")
    q = np.ascontiguousarray(np.resize(queries, (64 * batches, queries.shape[1])))  # repeats
    search(q[:64], k)  # warm-up
    best = float("inf")
    for i in range(batches):
        t0 = time.perf_counter()
        search(q[i * 64 : (i + 1) * 64], k)
        best = min(best, (time.perf_counter() - t0) * 1e3 / 64)
    return best


def measure_sets(
    search: SearchFn,
    timed: SearchFn,
    sets: list[QuerySet],
    groups: Groups,
    self_positions: np.ndarray,
    truth: np.ndarray,
    *,
    n_rows: int,
    recall_k: int,
    use_modality: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """``manifest["query_sets"]``: recall@1/10/100 (leave-one-out where a query is a row) and
    latency at batch 1 and 64 of each set, with the parameters already set on the index.
    ``timed`` is what serving searches with (the GPU copy when there is one);
    ``use_modality(m)`` is called before each set is measured, to set what queries of its
    modality are served with."""
    out = []
    k_target = min(recall_k, n_rows - 1)
    for s, part in zip(sets, groups.slices, strict=True):
        if use_modality is not None:
            use_modality(s.modality)
        q, pos, t = s.queries, self_positions[part], truth[part]
        recall: dict[str, float] = {}
        lower = None
        for kk in RECALL_KS:
            if len(q) and kk <= n_rows - 1:
                r, _, se = leave_one_out_recall(search, q, pos, t, kk)
                recall[str(kk)] = r
        if len(q) and k_target >= 1:
            r, _, se = leave_one_out_recall(search, q, pos, t, k_target)
            lower = r - CONFIDENCE_Z * se
        out.append(
            {
                "name": s.name,
                "modality": s.modality,
                "source": s.source,
                "n": len(s),
                "trusted": bool(s.trusted),
                "recall": recall,
                "recall_at_target_k_lower": lower,
                "latency_ms": {
                    "batch1_p50": batch1_p50_ms(timed, q, recall_k) if len(q) else None,
                    "batch64_per_query": batch64_ms_per_query(timed, q, recall_k)
                    if len(q)
                    else None,
                },
            }
        )
    return out


def worst_trusted(reports: list[dict[str, Any]], recall_k: int) -> dict[str, Any] | None:
    """The set the top-level recall fields describe: the worst trusted one (any, if none)."""
    measured = [r for r in reports if r["recall"]]
    pool = [r for r in measured if r["trusted"]] or measured
    if not pool:
        return None
    key = str(recall_k) if all(str(recall_k) in r["recall"] for r in pool) else None

    def score(r: dict[str, Any]) -> float:
        return r["recall"][key] if key else min(r["recall"].values())

    return min(pool, key=score)
