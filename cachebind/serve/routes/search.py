"""``POST /v1/search``: the cached rows nearest to a query, paged by offset or cursor."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

import numpy as np
from fastapi import APIRouter

from cachebind.serve import schemas as s
from cachebind.serve.deps import RequestLimits, State
from cachebind.serve.errors import unprocessable
from cachebind.serve.filters import FilterError, parse_filter
from cachebind.serve.inputs import query_embedding
from cachebind.serve.search import search as run_search

router = APIRouter()


@router.post("/v1/search", response_model=s.SearchResponse, tags=["v1"])
async def search(body: s.SearchRequest, state: State, limits: RequestLimits) -> s.SearchResponse:
    """Nearest cached rows to the query (any modality, a raw embedding, or a mix)."""
    max_k = limits.config.max_k
    limits.check_k(body.k)
    offset = decode_cursor(body.cursor) if body.cursor else body.offset
    if offset + body.k > max_k:
        raise unprocessable(
            "k_out_of_range",
            f"offset + k = {offset + body.k} is above the limit {max_k}",
        )
    try:
        where = parse_filter(body.filter) if body.filter is not None else None
    except FilterError as exc:
        raise unprocessable("bad_filter", str(exc)) from exc
    runtime, snap = state.require_snapshot()

    async def work() -> s.SearchResponse:
        f_m = await query_embedding(body.inputs, state.embed_one, runtime.dim)

        async def search_fn(q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            return await state.index_batcher.submit((snap, q, n))

        page = await run_search(
            snap,
            f_m,
            need=offset + body.k,
            search_fn=search_fn,
            run=asyncio.to_thread,
            where=where,
            dedup=body.dedup,
        )
        hits = page.hits[offset:]
        more = not page.exhausted and len(page.hits) == offset + body.k
        next_offset = offset + len(hits) if more else None
        return s.SearchResponse(
            results=[
                s.SearchHit(
                    id=h.id,
                    score=h.score,
                    key=h.row.get("key"),
                    caption=h.row.get("caption"),
                    url=h.row.get("url"),
                    width=h.row.get("width"),
                    height=h.row.get("height"),
                    image_url=f"/v1/images/{h.id}",
                )
                for h in hits
            ],
            offset=offset,
            next_offset=next_offset,
            next_cursor=encode_cursor(next_offset) if next_offset is not None else None,
            index_version=snap.version,
            exhausted=not more,
        )

    return await limits.timed(work())


def encode_cursor(offset: int) -> str:
    """The opaque ``next_cursor`` for a page that starts at ``offset``."""
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The offset a cursor of ``encode_cursor`` holds (422 ``bad_cursor`` for anything else)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        offset = json.loads(raw)["offset"]
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(offset)
        return offset
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise unprocessable("bad_cursor", "cursor is not one this service returned") from exc
