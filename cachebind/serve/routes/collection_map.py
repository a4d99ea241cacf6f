"""``GET /v1/map``: the stored 2-D map of the served table version, for the web page."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query

from cachebind.analysis.layout import latest_map_version, read_map
from cachebind.analysis.map_colours import colour_points, parse_colouring
from cachebind.serve.deps import State
from cachebind.serve.errors import ApiError, unprocessable

router = APIRouter()


@router.get("/v1/map", tags=["v1"])
async def collection_map(
    state: State,
    labels: str | None = Query(
        None,
        max_length=200,
        description="A label table of `cachebind classify` to colour by (`color=label:<table>`).",
    ),
    color: str | None = Query(
        None,
        max_length=260,
        description="What colours the points: `label:<label table>`, `shard` or `word:<word>` "
        "(rows whose caption holds the word, and the rest).",
    ),
) -> dict[str, Any]:
    """The map of the newest table version not newer than the served one: ids (decimal
    strings: JavaScript numbers lose int64 digits), x, y and, with ``color`` (or ``labels``),
    each point's category in ``labels``; at most ``analysis.max_map_points`` points (a seeded
    sample)."""
    _, snap = state.require_snapshot()
    store = state.settings.store
    cfg = state.settings.analysis
    if labels is not None and color is not None:
        raise unprocessable("bad_color", "give color or labels, not both")
    spec = f"label:{labels}" if labels is not None else color
    try:
        colouring = parse_colouring(spec, store.table) if spec is not None else None
    except ValueError as exc:
        code = "bad_labels" if labels is not None else "bad_color"
        raise unprocessable(code, str(exc)) from exc
    version = await asyncio.to_thread(latest_map_version, store, snap.table.version)
    if version is None:
        raise ApiError(404, "not_found", "no map of this table yet: run `cachebind map`")
    try:
        found = await asyncio.to_thread(
            read_map,
            store,
            version,
            max_points=cfg.map_max_points,
            seed=cfg.seed,
        )
    except FileNotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    points = found.points
    categories = None
    if colouring is not None:
        try:
            categories = await asyncio.to_thread(
                colour_points, store, found.table_version, points["id"], colouring
            )
        except FileNotFoundError as exc:  # a label table that was never written
            raise ApiError(404, "not_found", str(exc)) from exc
    return {
        "table_version": found.table_version,
        "served_version": snap.table.version,
        "method": found.method,
        "count": points.num_rows,
        "ids": [str(i) for i in points["id"].to_pylist()],
        "x": points["x"].to_pylist(),
        "y": points["y"].to_pylist(),
        "color": None if colouring is None else str(colouring),
        "labels": categories,
    }
