"""``GET /v1/images/{row_id}``: the thumbnail JPEG stored with a cached row."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from cachebind.serve import schemas as s
from cachebind.serve.deps import State
from cachebind.serve.errors import ApiError

INT64_MAX = 2**63 - 1  # row ids are int64 (cachebind.store.row_id)

router = APIRouter()


@router.get(
    "/v1/images/{row_id}",
    tags=["v1"],
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **s.ROW_ERRORS},
)
async def image(row_id: Annotated[int, Path(ge=0, le=INT64_MAX)], state: State) -> Response:
    """The thumbnail JPEG stored with a row (404 when the row or its thumbnail is absent)."""
    _, snap = state.require_snapshot()
    if "thumbnail" not in snap.table.dataset.schema.names:
        raise ApiError(404, "not_found", "this cache stores no thumbnails")
    rows = await asyncio.to_thread(snap.table.rows, [row_id], ["id", "thumbnail"])
    data = rows.column("thumbnail")[0].as_py() if rows.num_rows else None
    if not data:
        raise ApiError(404, "not_found", f"no thumbnail for id {row_id}")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private"})
