"""Operations: liveness and readiness probes (no key) and Prometheus metrics (user key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cachebind.serve.auth import Role, presented_key
from cachebind.serve.deps import State

# No key: load balancers and orchestrators probe these.
probes = APIRouter()
# Needs a user key (``create_app`` includes it with the key dependency).
router = APIRouter()


@probes.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers (no auth)."""
    return {"status": "ok"}


@probes.get(
    "/readyz",
    tags=["ops"],
    responses={503: {"description": "not ready yet: the same body with ready false"}},
)
async def readyz(request: Request, state: State) -> JSONResponse:
    """Readiness: the encoder and an index are loaded and the decode pool answers (no auth, so
    that load balancers and orchestrators can probe it; the load error, which may name server
    paths, is shown only to callers with a key)."""
    runtime = state.runtime
    snap = runtime.snapshot if runtime else None
    body = {
        "ready": bool(runtime and snap and state.media.ready),
        "encoder": runtime is not None,
        "decoder": state.media.ready,
        "index_version": snap.version if snap else None,
        "generator": bool(runtime and runtime.generator is not None),
    }
    key = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if key is not None and state.keys is not None and state.keys.role(key) is not Role.NONE:
        body["error"] = state.load_error or state.media.error or state.reload_error
    return JSONResponse(body, 200 if body["ready"] else 503)


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,  # no JSON 200 in the docs; errors stay JSON
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: State) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
