"""``POST /v1/enhance``: the cache-enhanced feature F~_M of a query and the neighbours that
made it. ``enhanced_of`` and ``neighbours_of`` are shared with ``generate``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter

from cachebind.cache import Enhanced
from cachebind.config import CacheConfig
from cachebind.serve import schemas as s
from cachebind.serve.deps import Limits, RequestLimits, State
from cachebind.serve.inputs import embed_query
from cachebind.serve.recall import recall_info
from cachebind.serve.runtime import IndexSnapshot, Runtime
from cachebind.serve.state import ServeState

router = APIRouter()


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
    items: list[s.InputItem],
    k: int | None,
    t: float | None,
    alpha: float | None,
) -> EnhancedQuery:
    """F~_M of ``items``; k, t and alpha left None take the runtime's cache defaults."""
    cache = _cache_defaults(state)
    k = cache.k if k is None else k
    t = cache.t if t is None else t
    alpha = cache.alpha if alpha is None else alpha
    limits.check_k(k)
    limits.check_inputs(items)
    runtime, snap = state.require_snapshot()
    query = await embed_query(items, state.embed_one, runtime.dim)
    enhanced = await state.enhance_batcher.submit(
        (snap, query.f_m, k, t, alpha, tuple(query.labels))
    )
    state.query_log.record(query.parts)
    recall = recall_info(snap.manifest, query.labels)
    return EnhancedQuery(runtime, snap, query.f_m, enhanced, k, t, alpha, recall)


def _cache_defaults(state: ServeState) -> CacheConfig:
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


@router.post("/v1/enhance", response_model=s.EnhanceResponse, tags=["v1"])
async def enhance(body: s.EnhanceRequest, state: State, limits: RequestLimits) -> s.EnhanceResponse:
    """F~_M = normalize((1 - alpha) F_M + alpha normalize(softmax(t S_topk) F_value))."""

    async def work() -> s.EnhanceResponse:
        q = await enhanced_of(state, limits, body.inputs, body.k, body.t, body.alpha)
        f_m = q.f_m
        tilde = np.asarray(q.enhanced.embedding, dtype=np.float32)
        norms = np.linalg.norm(f_m) * np.linalg.norm(tilde)
        cosine = float(f_m @ tilde / max(norms, np.float32(1e-12)))
        return s.EnhanceResponse(
            query_embedding=f_m.tolist(),
            embedding=tilde.tolist(),
            cosine_to_query=cosine,
            neighbours=await neighbours_of(q.snap, q.enhanced),
            k=q.k,
            t=q.t,
            alpha=q.alpha,
            index_version=q.snap.version,
            recall=q.recall,
        )

    return await limits.timed(work())
