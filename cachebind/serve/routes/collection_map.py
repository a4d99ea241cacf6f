"""``GET /v1/map``: the stored 2-D map of the served table version, for the web page;
``POST /v1/map/place``: where a query lands on it, by the layout model stored with the map."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query

from cachebind.analysis.layout import (
    Projection,
    latest_map_version,
    load_projection,
    map_metadata,
    read_map,
)
from cachebind.analysis.map_colours import colour_points, parse_colouring
from cachebind.config import StoreConfig
from cachebind.serve import schemas_analysis as sa
from cachebind.serve.deps import RequestLimits, State
from cachebind.serve.errors import ApiError, unprocessable
from cachebind.serve.inputs import embed_query

router = APIRouter()

# A UMAP model is tens of megabytes to unpickle: the last few are kept, keyed by the model
# table they came from (a recomputed map names another one).
_MODELS: dict[tuple[str, str], Projection] = {}
_MODELS_KEPT = 2


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


def _projection(store: StoreConfig, version: int) -> Projection:
    meta = map_metadata(store, version)
    key = (store.uri, str(meta.get("model")))
    if key not in _MODELS:
        projection = load_projection(store, version)
        while len(_MODELS) >= _MODELS_KEPT:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = projection
    return _MODELS[key]


@router.post("/v1/map/place", response_model=sa.PlaceResponse, tags=["v1"])
async def place_on_map(
    body: sa.PlaceRequest, state: State, limits: RequestLimits
) -> sa.PlaceResponse:
    """Where the query (any modality, a raw embedding, or a mix: F_M as search uses it) lands
    on the map ``GET /v1/map`` serves, placed by the layout model fitted with that map."""
    limits.check_inputs(body.inputs)
    runtime, snap = state.require_snapshot()
    store = state.settings.store
    version = await asyncio.to_thread(latest_map_version, store, snap.table.version)
    if version is None:
        raise ApiError(404, "not_found", "no map of this table yet: run `cachebind map`")
    try:
        projection = await asyncio.to_thread(_projection, store, version)
    except FileNotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc

    async def work() -> sa.PlaceResponse:
        query = await embed_query(body.inputs, state.embed_one, runtime.dim)
        x, y = (await asyncio.to_thread(projection.transform, query.f_m[None, :]))[0]
        return sa.PlaceResponse(
            x=float(x), y=float(y), table_version=version, method=projection.method
        )

    return await limits.timed(work())
