"""``GET /v1/map``: the stored 2-D map of the served table version, for the web page."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter, Query

from cachebind.analysis.layout import latest_map_version, read_map
from cachebind.serve.deps import State
from cachebind.serve.errors import ApiError, unprocessable

router = APIRouter()


@router.get("/v1/map", tags=["v1"])
async def collection_map(
    state: State,
    labels: str | None = Query(
        None, max_length=200, description="A label table of `cachebind classify` to colour by."
    ),
) -> dict[str, Any]:
    """The map of the newest table version not newer than the served one: ids (decimal
    strings: JavaScript numbers lose int64 digits), x, y and, with ``labels``, each point's
    zero-shot label; at most ``analysis.max_map_points`` points (a seeded sample)."""
    _, snap = state.require_snapshot()
    store = state.settings.store
    cfg = state.settings.analysis
    if labels is not None and not re.fullmatch(
        rf"{re.escape(store.table)}_labels_[0-9a-f]{{12}}", labels
    ):
        raise unprocessable("bad_labels", f"labels must name a label table of {store.table!r}")
    version = await asyncio.to_thread(latest_map_version, store, snap.table.version)
    if version is None:
        raise ApiError(404, "not_found", "no map of this table yet: run `cachebind map`")
    try:
        found = await asyncio.to_thread(
            read_map,
            store,
            version,
            labels_table=labels,
            max_points=cfg.map_max_points,
            seed=cfg.seed,
        )
    except FileNotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    points = found.points
    return {
        "table_version": found.table_version,
        "served_version": snap.table.version,
        "method": found.method,
        "count": points.num_rows,
        "ids": [str(i) for i in points["id"].to_pylist()],
        "x": points["x"].to_pylist(),
        "y": points["y"].to_pylist(),
        "labels": points["label"].to_pylist() if "label" in points.column_names else None,
    }
