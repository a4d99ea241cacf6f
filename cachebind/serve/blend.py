"""The cache blend of the service: F~_M of a query's inputs and the neighbours that made it.

Plain functions over a ``ServeState``, shared by the native routes (``/v1/enhance``,
``/v1/generate``) and the OpenAI-compatible ones; no route module imports another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cachebind.cache import Enhanced
from cachebind.config import CacheConfig
from cachebind.serve import schemas as s
from cachebind.serve.deps import Limits
from cachebind.serve.inputs import embed_query
from cachebind.serve.recall import recall_info
from cachebind.serve.runtime import IndexSnapshot, Runtime
from cachebind.serve.services.enhance import EnhanceQuery
from cachebind.serve.state import ServeState


@dataclass(frozen=True)
class EnhancedQuery:
    """One query enhanced on one index version, with the k, t and alpha actually used."""

    runtime: Runtime
    snap: IndexSnapshot  # the version the neighbours come from
    f_m: np.ndarray  # F_M, the query's own feature
    enhanced: Enhanced  # F~_M and its S_topk neighbours
    k: int
    t: float
    alpha: float
    recall: s.RecallInfo  # what the version's manifest promises for the query's modalities


async def enhanced_of(
    state: ServeState,
    limits: Limits,
    items: Sequence[s.InputItem],
    k: int | None,
    t: float | None,
    alpha: float | None,
    field: str = "inputs",
) -> EnhancedQuery:
    """F~_M of ``items``; k, t and alpha left None take the runtime's cache defaults."""
    cache = cache_defaults(state)
    k = cache.k if k is None else k
    t = cache.t if t is None else t
    alpha = cache.alpha if alpha is None else alpha
    limits.check_k(k)
    limits.check_inputs(items, field)
    runtime, snap = state.require_snapshot()
    query = await embed_query(items, state.embed_one, runtime.dim, field)
    enhanced = await state.enhance.enhance(
        EnhanceQuery(snap, query.f_m, k, t, alpha, tuple(query.labels))
    )
    state.query_log.record(query.parts)
    recall = recall_info(snap.manifest, query.labels)
    return EnhancedQuery(runtime, snap, query.f_m, enhanced, k, t, alpha, recall)


def cache_defaults(state: ServeState) -> CacheConfig:
    return state.runtime.cache_config if state.runtime else state.settings.cache


async def neighbours_of(snap: IndexSnapshot, enhanced: Enhanced) -> list[s.Neighbour]:
    """The S_topk neighbours of ``enhanced`` with their softmax weights, key and caption."""
    ids = [int(i) for i in enhanced.ids]
    rows = await asyncio.to_thread(snap.table.rows, ids, ["id", "key", "caption"])
    meta = {r["id"]: r for r in rows.to_pylist()}
    return [
        s.Neighbour(
            id=i,
            similarity=float(sim),
            weight=float(w),
            key=meta.get(i, {}).get("key"),
            caption=meta.get(i, {}).get("caption"),
        )
        for i, sim, w in zip(ids, enhanced.similarities, enhanced.weights, strict=True)
    ]


@dataclass(frozen=True)
class VisualPrompt:
    """What the adapter's visual query gets: F~_M as [1, d] (None for a text-only prompt),
    the neighbours that made it, and the blend used (None where no blend ran)."""

    visual: np.ndarray | None = None
    neighbours: list[s.Neighbour] = field(default_factory=list)
    query: EnhancedQuery | None = None


async def visual_prompt(
    state: ServeState,
    limits: Limits,
    items: Sequence[s.InputItem],
    k: int | None = None,
    t: float | None = None,
    alpha: float | None = None,
    *,
    blend: bool = True,
    field: str = "inputs",
) -> VisualPrompt:
    """The visual feature of a generation: F~_M of ``items`` (none: plain LLaMA).

    ``blend=False`` skips the cache: the adapter gets normalize(F_M), which is F~_M at
    alpha = 0, without a search (and without needing a published index).
    """
    if not items:
        return VisualPrompt()  # text only: plain LLaMA, the adapter's visual query is off
    if not blend:
        limits.check_inputs(items, field)
        runtime = state.require_runtime()
        f_m = (await embed_query(items, state.embed_one, runtime.dim, field)).f_m
        unit = f_m / max(float(np.linalg.norm(f_m)), 1e-12)
        return VisualPrompt(np.asarray(unit, dtype=np.float32)[None, :])
    q = await enhanced_of(state, limits, items, k, t, alpha, field)
    visual = np.asarray(q.enhanced.embedding, dtype=np.float32)[None, :]
    return VisualPrompt(visual, await neighbours_of(q.snap, q.enhanced), q)
