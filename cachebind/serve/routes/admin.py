"""The served index: what it is (``GET /v1/index``, user key) and loading the newly published
version (``POST /v1/admin/reload``, admin key)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from cachebind.errors import IndexMismatchError
from cachebind.serve import schemas as s
from cachebind.serve.auth import Role
from cachebind.serve.deps import State, require_admin, require_user
from cachebind.serve.errors import ApiError
from cachebind.serve.recall import query_set_reports, recall_by_modality_report
from cachebind.store.errors import EncoderMismatchError

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
    """Load the published index versions now (the main index and each extra encoder's;
    ``force`` reloads even the same version), and re-read the key files."""
    if state.keys_from_files:
        try:
            state.keys = await asyncio.to_thread(state.read_keys)
        except (OSError, ValueError) as exc:  # keep the keys in force
            raise ApiError(409, "bad_key_file", str(exc)) from exc
    try:
        swapped = await state.reload(force=force)
    except IndexMismatchError as exc:
        raise ApiError(409, "index_mismatch", str(exc)) from exc
    except EncoderMismatchError as exc:
        raise ApiError(409, "encoder_mismatch", str(exc)) from exc
    except FileNotFoundError as exc:
        raise ApiError(409, "index_unavailable", str(exc)) from exc
    runtime = state.runtime
    snap = runtime.snapshot if runtime else None
    extra = runtime.extra_search if runtime else {}
    return s.ReloadResponse(
        reloaded=swapped,
        version=snap.version if snap else None,
        detail="" if swapped else "already serving the published version",
        extra_versions={name: searcher.version for name, searcher in extra.items()},
    )


@info.get("/v1/index", response_model=s.IndexInfo, tags=["v1"])
async def index_info(state: State, role: Annotated[Role, Depends(require_user)]) -> s.IndexInfo:
    """The index version being served, its manifest (without server paths for a user key),
    recall@1/10/100 and latency per query set, and the query log's counts."""
    runtime = state.require_runtime()
    snap = runtime.snapshot
    query_log = s.QueryLogInfo(**state.query_log.describe())
    if snap is None:
        return s.IndexInfo(
            version=None,
            manifest=None,
            table_version=None,
            rows=None,
            dim=None,
            query_log=query_log,
        )
    rows = snap.rows
    return s.IndexInfo(
        version=snap.version,
        manifest=_manifest_for(snap.manifest.to_json(), role),
        table_version=int(snap.table.version),
        rows=rows,
        dim=int(snap.table.dim),
        query_sets=query_set_reports(snap.manifest),
        recall_by_modality=recall_by_modality_report(snap.manifest),
        query_log=query_log,
    )


# Manifest entries that name where the server keeps things (the table's URI, index files).
_PATH_KEYS = frozenset({"uri", "path", "dir", "root", "location"})
_PATH_SUFFIXES = ("_uri", "_path", "_dir", "_root")


def _manifest_for(manifest: dict[str, Any], role: Role) -> dict[str, Any]:
    """The manifest as JSON; for a user key without filesystem paths or storage URIs."""
    plain = json.loads(json.dumps(manifest, default=str))
    return plain if role >= Role.ADMIN else _without_paths(plain)


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_paths(v)
            for k, v in value.items()
            if not (k.lower() in _PATH_KEYS or k.lower().endswith(_PATH_SUFFIXES))
            and not _looks_like_path(v)
        }
    if isinstance(value, list):
        return [_without_paths(v) for v in value if not _looks_like_path(v)]
    return value


def _looks_like_path(value: Any) -> bool:
    return isinstance(value, str) and (
        value.startswith(("/", "~", "./", "../", "\\\\")) or "://" in value or ":\\" in value
    )
