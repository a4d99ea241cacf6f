"""``POST /v1/enhance``: the cache-enhanced feature F~_M of a query and the neighbours that
made it (computed by ``serve.blend``)."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter

from cachebind.serve import schemas as s
from cachebind.serve.blend import enhanced_of, neighbours_of
from cachebind.serve.deps import RequestLimits, State
from cachebind.serve.multipart import form_schema

router = APIRouter()


@router.post(
    "/v1/enhance",
    response_model=s.EnhanceResponse,
    tags=["v1"],
    openapi_extra=form_schema(
        {"k": {"type": "integer"}, "t": {"type": "number"}, "alpha": {"type": "number"}}
    ),
)
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
