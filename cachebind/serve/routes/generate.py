"""``POST /v1/generate``: LLaMA text with the cache-enhanced visual feature F~_M injected,
streamed as server-sent events or answered whole."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from cachebind.errors import GenerationBusy
from cachebind.serve import schemas as s
from cachebind.serve.deps import Limits, RequestLimits, State
from cachebind.serve.errors import ApiError
from cachebind.serve.routes.enhance import enhanced_of, neighbours_of
from cachebind.serve.state import ServeState
from cachebind.serve.streaming import scheduled_stream, sse

log = logging.getLogger("cachebind.serve")

router = APIRouter()


@dataclass(frozen=True)
class VisualPrompt:
    """What the adapter's visual query gets: F~_M as [1, d] (None for a text-only prompt)."""

    visual: np.ndarray | None = None
    neighbours: list[s.Neighbour] = field(default_factory=list)


async def visual_prompt(state: ServeState, limits: Limits, body: s.GenerateRequest) -> VisualPrompt:
    if not body.inputs:
        return VisualPrompt()  # text only: plain LLaMA, the adapter's visual query is off
    q = await enhanced_of(state, limits, body.inputs, body.k, body.t, body.alpha)
    visual = np.asarray(q.enhanced.embedding, dtype=np.float32)[None, :]
    return VisualPrompt(visual, await neighbours_of(q.snap, q.enhanced))


async def collect(pieces: AsyncIterator[str]) -> str:
    return "".join([p async for p in pieces])


async def until_disconnected(request: Request, work: Any, poll_s: float = 0.25) -> Any:
    """``work``'s result, or None once the client has disconnected (``work`` is cancelled,
    which cancels its generation)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@router.post(
    "/v1/generate",
    tags=["v1"],
    response_model=s.GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **s.QUEUE_ERRORS},
)
async def generate(
    body: s.GenerateRequest, state: State, limits: RequestLimits, request: Request
) -> Any:
    """Text from LLaMA with the cache-enhanced visual feature F~_M injected.

    ``stream: true`` (default) answers ``text/event-stream``: ``data: {"text": piece}``
    events, then ``event: done`` with the whole text (or ``event: error``).
    """
    runtime = state.require_runtime()
    if runtime.generator is None:
        raise ApiError(503, "no_llm", "this server has no LLM configured (llm.llama_dir)")

    limits.check_inputs(body.inputs)
    prompt = await limits.timed(visual_prompt(state, limits, body))
    neighbours = prompt.neighbours
    options = {
        "max_new_tokens": body.max_new_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
    }
    try:
        scheduled = scheduled_stream(
            runtime, body.prompt, prompt.visual, options, limits.config.request_timeout_s
        )
    except GenerationBusy as exc:
        raise ApiError(
            429, "busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from None
    pieces = scheduled.pieces
    if not body.stream:
        text = await until_disconnected(request, collect(pieces))
        if text is None:  # the client left: its slot is already free
            return Response(status_code=499)
        return s.GenerateResponse(text=text, neighbours=neighbours)

    async def events() -> AsyncIterator[str]:
        neighbours_json = [n.model_dump() for n in neighbours]
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
            yield sse({"text": "".join(text)}, event="done")
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
