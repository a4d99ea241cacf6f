"""Running one generation for a route: queue it on the scheduler, collect or stream its text,
report its finish reason and token counts. Shared by ``/v1/generate`` and the OpenAI-compatible
routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request

from cachebind.errors import GenerationBusy
from cachebind.serve.errors import ApiError
from cachebind.serve.runtime import Runtime
from cachebind.serve.state import ServeState
from cachebind.serve.streaming import ScheduledStream, scheduled_stream

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""The scheduler's end reasons as OpenAI's (and the native stream's) ``finish_reason``."""


def require_generator(state: ServeState) -> Runtime:
    """The runtime, with a 503 ``no_llm`` when this server has no LLM."""
    runtime = state.require_runtime()
    if runtime.generator is None:
        raise ApiError(503, "no_llm", "this server has no LLM configured (llm.llama_dir)")
    return runtime


def start_generation(
    state: ServeState,
    prompt: str,
    visual: np.ndarray | None,
    options: dict[str, Any],
) -> ScheduledStream:
    """Queue a generation now: a full queue is a 429 ``busy`` with ``Retry-After`` before any
    response starts. ``options``: the scheduler's (``max_new_tokens``, ``temperature``,
    ``top_p``, ``seed``, ``stop``, ``template``); None values take the server's defaults."""
    runtime = require_generator(state)
    try:
        return scheduled_stream(runtime, prompt, visual, options, state.config.request_timeout_s)
    except GenerationBusy as exc:
        raise ApiError(
            429, "busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from None


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished generation."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


def usage_of(scheduled: ScheduledStream) -> Usage:
    """The prompt and generated token counts of an ended generation."""
    handle = scheduled.handle
    return Usage(int(handle.prompt_tokens), len(handle.tokens))


def finish_reason_of(scheduled: ScheduledStream) -> str:
    """``stop`` (end of sequence or a stop string) or ``length`` (the token budget)."""
    return FINISH_REASONS.get(scheduled.handle.finish_reason or "", "stop")


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
