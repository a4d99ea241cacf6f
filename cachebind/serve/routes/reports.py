"""``GET /v1/reports/gap``: the last `cachebind report gap` written in the index directory."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from cachebind.analysis.gap_report import REPORT_DIR, read_gap_report
from cachebind.serve.deps import State
from cachebind.serve.errors import ApiError

router = APIRouter()


@router.get("/v1/reports/gap", tags=["v1"])
async def gap(state: State) -> dict[str, Any]:
    """The gap report's numbers (as gap.json) and its plots as PNG ``data:`` URLs."""
    folder = state.settings.index.dir / REPORT_DIR
    try:
        return await asyncio.to_thread(read_gap_report, folder)
    except FileNotFoundError:
        raise ApiError(404, "not_found", "no gap report yet: run `cachebind report gap`") from None
