"""One generation for a route: queue it through the app's generate service, collect or stream
its text, report its finish reason and token counts. Shared by ``/v1/generate`` and the
OpenAI-compatible routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from cachebind.serve.runtime import Runtime
from cachebind.serve.services.generate import GenerationRequest
from cachebind.serve.services.generate import require_generator as generator_of
from cachebind.serve.state import ServeState
from cachebind.serve.streaming import ScheduledStream

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""The scheduler's end reasons as OpenAI's (and the native stream's) ``finish_reason``."""


def require_generator(state: ServeState) -> Runtime:
    """The runtime, with a 503 ``no_llm`` when this server has no LLM."""
    return generator_of(state.require_runtime())


def start_generation(state: ServeState, request: GenerationRequest) -> ScheduledStream:
    """Queue ``request`` on this app's generate service (503 without an LLM, 429 with
    ``Retry-After`` on a full queue, both before any response starts)."""
    return state.generate.start(state.require_runtime(), request)


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
