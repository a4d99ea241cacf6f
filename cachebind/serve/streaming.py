"""Server-sent events of a generation that runs in a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cachebind.serve.runtime import Runtime


def sse(payload: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n"


async def stream_in_thread(
    runtime: Runtime,
    prompt: str,
    visual: np.ndarray | None,
    options: dict[str, Any],
    executor: ThreadPoolExecutor,
) -> AsyncIterator[str]:
    """The generator's text pieces, produced in a worker thread, consumed here as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        if stop.is_set():  # the client left while this generation waited for the model
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            return
        stream = runtime.generate_stream(prompt, visual, **options)
        try:
            for piece in stream:
                if stop.is_set():  # the client went away: stop spending tokens on it
                    break
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
        finally:
            stream.close()

    worker = loop.run_in_executor(executor, produce)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                break
    finally:
        stop.set()
        # One still waiting for the model thread is dropped from its queue; a running one
        # stops at its next token.
        worker.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await worker
