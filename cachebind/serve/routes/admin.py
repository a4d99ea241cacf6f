"""The served index: what it is (``GET /v1/index``, user key) and loading the newly published
version (``POST /v1/admin/reload``, admin key)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends

from cachebind.errors import IndexMismatchError
from cachebind.serve import schemas as s
from cachebind.serve.deps import State, require_admin
from cachebind.serve.errors import ApiError

# Admin key per route (not the user-key dependency the keyed routers are included with).
router = APIRouter()
# Needs a user key (``create_app`` includes it with the key dependency).
info = APIRouter()


@router.post(
    "/v1/admin/reload",
    response_model=s.ReloadResponse,
    dependencies=[Depends(require_admin)],
    tags=["admin"],
    responses=s.COMMON_ERRORS | s.ADMIN_ERRORS,
)
async def admin_reload(state: State, force: bool = False) -> s.ReloadResponse:
    """Load the published index version now (``force`` reloads even the same version),
    and re-read the key files."""
    if state.keys_from_files:
        try:
            state.keys = await asyncio.to_thread(state.read_keys)
        except (OSError, ValueError) as exc:  # keep the keys in force
            raise ApiError(409, "bad_key_file", str(exc)) from exc
    try:
        swapped = await state.reload(force=force)
    except IndexMismatchError as exc:
        raise ApiError(409, "index_mismatch", str(exc)) from exc
    except FileNotFoundError as exc:
        raise ApiError(409, "index_unavailable", str(exc)) from exc
    snap = state.runtime.snapshot if state.runtime else None
    return s.ReloadResponse(
        reloaded=swapped,
        version=snap.version if snap else None,
        detail="" if swapped else "already serving the published version",
    )


@info.get("/v1/index", response_model=s.IndexInfo, tags=["v1"])
async def index_info(state: State) -> s.IndexInfo:
    """The index version being served and its manifest."""
    runtime = state.require_runtime()
    snap = runtime.snapshot
    if snap is None:
        return s.IndexInfo(version=None, manifest=None, table_version=None, rows=None, dim=None)
    rows = snap.rows
    return s.IndexInfo(
        version=snap.version,
        manifest=json.loads(json.dumps(snap.manifest, default=str)),
        table_version=int(snap.table.version),
        rows=rows,
        dim=int(snap.table.dim),
    )
