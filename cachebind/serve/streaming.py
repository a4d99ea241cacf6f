"""Server-sent events of a generation that runs on the scheduler's thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cachebind.serve.runtime import Runtime


def sse(payload: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n"


def scheduled_stream(
    runtime: Runtime,
    prompt: str,
    visual: np.ndarray | None,
    options: dict[str, Any],
    timeout_s: float | None = None,
) -> ScheduledStream:
    """Queue the generation now (``SchedulerBusy`` / ``InputError`` raise here, before any
    response starts) and return its text pieces as the scheduler's thread produces them.

    Closing the iterator (a client that left, a cancelled request task) or ``cancel()``
    cancels the generation: the scheduler frees its slot at its next step.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def sink(kind: str, value: Any) -> None:  # called on the scheduler's thread
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    handle = runtime.submit_generation(prompt, visual, sink=sink, timeout_s=timeout_s, **options)

    async def pieces() -> AsyncGenerator[str, None]:
        try:
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            handle.cancel()

    return ScheduledStream(pieces(), handle.cancel, handle)


@dataclass(frozen=True)
class ScheduledStream:
    """A queued generation's text pieces, and how to cancel it even if they are never read
    (a streaming response dropped before its first event never runs the iterator's cleanup)."""

    pieces: AsyncGenerator[str, None]
    cancel: Callable[[], None]
    handle: Any  # inject.handles.GenerationHandle: its tokens and finish reason, once ended
