"""``POST /v1/export``: rows of the served table version as a Parquet or CSV file."""

from __future__ import annotations

import asyncio
import io

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fastapi import APIRouter
from fastapi.responses import Response

from cachebind.serve import schemas_analysis as sa
from cachebind.serve.deps import State
from cachebind.serve.errors import ApiError

router = APIRouter()

COLUMNS = ["id", "key", "caption", "url", "width", "height", "shard"]
MEDIA_TYPES = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv"}


def encode(rows: pa.Table, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(rows, buf)
    else:
        pacsv.write_csv(rows, buf)
    return buf.getvalue()


@router.post(
    "/v1/export",
    tags=["v1"],
    responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}},
)
async def export(body: sa.ExportRequest, state: State) -> Response:
    """The metadata of the rows ``ids`` (at most ``analysis.max_export_rows``), in order."""
    limit = state.settings.analysis.max_export_rows
    if len(body.ids) > limit:
        raise ApiError(
            413,
            "too_many_ids",
            f"{len(body.ids)} ids; the limit is {limit} (analysis.max_export_rows)",
        )
    _, snap = state.require_snapshot()
    table = snap.table
    columns = [c for c in COLUMNS if c in table.dataset.schema.names]
    rows = await asyncio.to_thread(table.rows, body.ids, columns)
    data = await asyncio.to_thread(encode, rows, body.format)
    name = f"cachebind-rows.{body.format}"
    return Response(
        data,
        media_type=MEDIA_TYPES[body.format],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
