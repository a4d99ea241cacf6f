"""``POST /v1/search/{encoder}``: the cached rows nearest to an extra encoder's (CLIP-336,
DINOv2) vector of one image, in the index of its ``vector_<encoder>`` column."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from cachebind.modalities import Modality
from cachebind.preprocess.extra import image_pixels
from cachebind.serve import schemas as s
from cachebind.serve.deps import RequestLimits, State
from cachebind.serve.errors import ApiError, unprocessable
from cachebind.serve.inputs import decode_item
from cachebind.serve.signing import signed_image_url

router = APIRouter()

COLUMNS = ["id", "key", "caption", "url", "width", "height"]


@router.post("/v1/search/{encoder}", response_model=s.ExtraSearchResponse, tags=["v1"])
async def extra_search(
    encoder: str,
    body: s.ExtraSearchRequest,
    state: State,
    limits: RequestLimits,
    request: Request,
) -> s.ExtraSearchResponse:
    """Nearest cached rows to ``encoder``'s own vector of the image (``serve.extra_indexes``)."""
    limits.check_k(body.k)
    runtime = state.require_runtime()
    searcher = runtime.extra_search.get(encoder)
    if searcher is None:
        served = ", ".join(sorted(runtime.extra_search)) or "none"
        detail = f"no index of encoder {encoder[:40]!r} is served here (served: {served})"
        raise ApiError(404, "not_found", detail)
    item = body.input
    if item.modality is not Modality.IMAGE or item.data is None:
        raise unprocessable(
            "unsupported_modality", f"input: {encoder} encodes images; send one as data"
        )
    modality, raw = decode_item(item, "input")
    ttl = limits.config.image_url_ttl_s

    async def work() -> s.ExtraSearchResponse:
        pixels = await state.media.decode(
            modality, raw, "input", decoder=image_pixels, spec=searcher.encoder.preprocess
        )
        query = await asyncio.to_thread(searcher.encode, pixels)
        served = searcher.current  # one version for the whole request
        scores, ids = await asyncio.to_thread(served.search, query, body.k)
        keep = ids >= 0  # FAISS pads a short result with -1
        scores, ids = scores[keep], ids[keep]
        rows = await asyncio.to_thread(served.table.rows, ids.tolist(), COLUMNS)
        meta = {r["id"]: r for r in rows.to_pylist()}
        base = str(request.base_url)
        return s.ExtraSearchResponse(
            encoder=encoder,
            column=f"vector_{encoder}",
            index_version=served.version,
            results=[
                s.SearchHit(
                    id=int(i),
                    score=float(score),
                    key=meta.get(int(i), {}).get("key"),
                    caption=meta.get(int(i), {}).get("caption"),
                    url=meta.get(int(i), {}).get("url"),
                    width=meta.get(int(i), {}).get("width"),
                    height=meta.get(int(i), {}).get("height"),
                    image_url=f"/v1/images/{int(i)}",
                    thumbnail_url=signed_image_url(base, state.cursor_secret, int(i), ttl),
                )
                for i, score in zip(ids, scores, strict=True)
            ],
        )

    return await limits.timed(work())
