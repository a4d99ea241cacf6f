"""``POST /v1/search``: the cached rows nearest to a query, paged by offset or cursor."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from cachebind.serve import schemas as s
from cachebind.serve.cursors import decode_cursor, encode_cursor, query_digest
from cachebind.serve.deps import RequestLimits, State
from cachebind.serve.errors import unprocessable
from cachebind.serve.filters import FilterError, parse_filter
from cachebind.serve.inputs import embed_query
from cachebind.serve.label_filter import label_where
from cachebind.serve.multipart import form_schema
from cachebind.serve.recall import recall_info
from cachebind.serve.signing import signed_image_url

router = APIRouter()


@router.post(
    "/v1/search",
    response_model=s.SearchResponse,
    tags=["v1"],
    openapi_extra=form_schema(
        {
            "k": {"type": "integer"},
            "offset": {"type": "integer"},
            "cursor": {"type": "string"},
            "filter": {"type": "string"},
            "dedup": {"type": "number"},
        }
    ),
)
async def search(
    body: s.SearchRequest, state: State, limits: RequestLimits, request: Request
) -> s.SearchResponse:
    """Nearest cached rows to the query (any modality, a raw embedding, or a mix)."""
    max_k = limits.config.max_k
    limits.check_k(body.k)
    limits.check_inputs(body.inputs)
    try:
        where = parse_filter(body.filter) if body.filter is not None else None
    except FilterError as exc:
        raise unprocessable("bad_filter", str(exc)) from exc
    if body.label_filter is not None:
        where = await label_where(state.settings.store, body.label_filter, where)
    # The digest of a big request (megabytes of base64) is hashed off the event loop.
    digest = await asyncio.to_thread(query_digest, _paged_query(body))
    offset = decode_cursor(state.cursor_secret, body.cursor, digest) if body.cursor else body.offset
    if offset + body.k > max_k:
        raise unprocessable(
            "k_out_of_range",
            f"offset + k = {offset + body.k} is above the limit {max_k}",
        )
    runtime, snap = state.require_snapshot()
    ttl = limits.config.image_url_ttl_s

    async def work() -> s.SearchResponse:
        query = await embed_query(body.inputs, state.embed_one, runtime.dim)
        page = await state.search.page(
            snap,
            query.f_m,
            tuple(query.labels),
            need=offset + body.k,
            where=where,
            dedup=body.dedup,
            max_widenings=limits.config.search_max_widenings,
            max_candidates=limits.config.search_max_candidates,
        )
        hits = page.hits[offset:]
        more = not page.exhausted and len(page.hits) == offset + body.k
        next_offset = offset + len(hits) if more else None
        state.query_log.record(query.parts)
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
                    thumbnail_url=signed_image_url(
                        str(request.base_url), state.cursor_secret, h.id, ttl
                    ),
                )
                for h in hits
            ],
            offset=offset,
            next_offset=next_offset,
            next_cursor=(
                encode_cursor(state.cursor_secret, next_offset, digest)
                if next_offset is not None
                else None
            ),
            index_version=snap.version,
            exhausted=not more and not page.partial,
            partial=page.partial,
            recall=recall_info(snap.manifest, query.labels),
        )

    return await limits.timed(work())


def _paged_query(body: s.SearchRequest) -> dict[str, Any]:
    """What a page of results depends on, so what a cursor is bound to."""
    return body.model_dump(mode="json", include={"inputs", "filter", "label_filter", "dedup", "k"})
