"""``POST /v1/generate``: LLaMA text with the cache-enhanced visual feature F~_M injected,
streamed as server-sent events or answered whole."""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from cachebind.serve import schemas as s
from cachebind.serve.blend import VisualPrompt, visual_prompt
from cachebind.serve.deps import RequestLimits, State
from cachebind.serve.errors import unprocessable
from cachebind.serve.generation import (
    collect,
    finish_reason_of,
    require_generator,
    start_generation,
    until_disconnected,
    usage_of,
)
from cachebind.serve.llava import CachedRow, llava_of, prompt_images, refuse_blend
from cachebind.serve.multipart import form_schema
from cachebind.serve.services.generate import GenerationRequest
from cachebind.serve.streaming import sse

log = logging.getLogger("cachebind.serve")

router = APIRouter()


@router.post(
    "/v1/generate",
    tags=["v1"],
    response_model=s.GenerateResponse,
    responses={
        200: {
            "description": s.GENERATE_EVENTS,
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string", "description": s.GENERATE_EVENTS}
                }
            },
        },
        **s.QUEUE_ERRORS,
    },
    openapi_extra=form_schema(
        {
            "prompt": {"type": "string"},
            "stream": {"type": "boolean"},
            "max_new_tokens": {"type": "integer"},
            "temperature": {"type": "number"},
            "top_p": {"type": "number"},
            "seed": {"type": "integer"},
            "k": {"type": "integer"},
            "t": {"type": "number"},
            "alpha": {"type": "number"},
        }
    ),
)
async def generate(
    body: s.GenerateRequest, state: State, limits: RequestLimits, request: Request
) -> Any:
    """Text from LLaMA with the cache-enhanced visual feature F~_M injected (adapter mode),
    or from LLaVA-1.5 with each image's visual tokens in the prompt (llava mode; no
    neighbours).

    ``stream: true`` (default) answers ``text/event-stream``: ``event: neighbours``, then
    ``data: {"text": piece}`` events, then ``event: done`` with the whole text, the finish
    reason and the token counts (or ``event: error``).
    """
    require_generator(state)
    limits.check_inputs(body.inputs)
    llava = llava_of(state)
    if llava is not None:  # tokens mode: the images' visual tokens stand in the prompt
        refuse_blend(k=body.k, t=body.t, alpha=body.alpha)
        rows = [CachedRow(i, f"image_ids[{n}]") for n, i in enumerate(body.image_ids)]
        images = await limits.timed(prompt_images(state, limits, llava, [*rows, *body.inputs]))
        prompt = VisualPrompt()
    else:
        if body.image_ids:
            raise unprocessable(
                "unsupported_input",
                "image_ids: cached rows stand for images in llava mode (llm.mode); this "
                "server runs the adapter, whose visual feature is the blend of inputs",
            )
        images = None
        prompt = await limits.timed(
            visual_prompt(state, limits, body.inputs, body.k, body.t, body.alpha)
        )
    neighbours = prompt.neighbours
    generation = GenerationRequest(
        body.prompt,
        prompt.visual,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        images=images,
    )
    scheduled = start_generation(state, generation)
    pieces = scheduled.pieces
    if not body.stream:
        text = await until_disconnected(request, collect(pieces))
        if text is None:  # the client left: its slot is already free
            return Response(status_code=499)
        return s.GenerateResponse(
            text=text,
            neighbours=neighbours,
            finish_reason=finish_reason_of(scheduled),
            usage=usage_of(scheduled).as_dict(),
        )

    async def events() -> AsyncIterator[str]:
        neighbours_json = [n.model_dump(mode="json") for n in neighbours]
        try:
            yield sse({"neighbours": neighbours_json}, event="neighbours")
            text = []
            try:
                async for piece in pieces:
                    text.append(piece)
                    yield sse({"text": piece})
            except Exception as exc:
                log.exception("generation failed")
                yield sse({"error": "generation_failed", "detail": type(exc).__name__}, "error")
                return
            done = s.GenerateDoneEvent(
                text="".join(text),
                finish_reason=finish_reason_of(scheduled),
                usage=usage_of(scheduled).as_dict(),
            )
            yield sse(done.model_dump(mode="json"), event="done")
        finally:
            await pieces.aclose()
            scheduled.cancel()

    stream = events()
    # A stream cancelled before its first event never runs its finally: free the slot anyway.
    weakref.finalize(stream, scheduled.cancel)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
