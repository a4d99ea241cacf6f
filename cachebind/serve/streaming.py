"""Server-sent events of a generation that runs on the scheduler's thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cachebind.inject.handles import wake_later
from cachebind.serve.runtime import Runtime


class LoopMailbox:
    """Events from the scheduler's threads to the streams of one event loop.

    A post while a wake-up is already pending adds to it, and inside the delivery's
    ``one_wakeup`` burst the wake-up waits for the burst's end: the loop is woken once per
    decode step for all its streams, not once per stream and token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[tuple[asyncio.Queue[tuple[str, Any]], tuple[str, Any]]] = deque()
        self._lock = threading.Lock()
        self._pending = False

    def post(self, queue: asyncio.Queue[tuple[str, Any]], item: tuple[str, Any]) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._pending:
                return
            self._pending = True
        if not wake_later(self, self._wake):
            self._wake()

    def _wake(self) -> None:
        # A closed loop has nobody left to read these events.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._pending = False
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = (
    weakref.WeakKeyDictionary()
)
_mailboxes_lock = threading.Lock()


def mailbox_of(loop: asyncio.AbstractEventLoop) -> LoopMailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = LoopMailbox(loop)
        return box


def sse(payload: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n"


def scheduled_stream(
    runtime: Runtime,
    prompt: str,
    visual: np.ndarray | None,
    options: dict[str, Any],
    timeout_s: float | None = None,
    images: Any = None,
) -> ScheduledStream:
    """Queue the generation now (``SchedulerBusy`` / ``InputError`` raise here, before any
    response starts) and return its text pieces as the scheduler's thread produces them.

    Closing the iterator (a client that left, a cancelled request task) or ``cancel()``
    cancels the generation: the scheduler frees its slot at its next step.
    """
    mailbox = mailbox_of(asyncio.get_running_loop())
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def sink(kind: str, value: Any) -> None:  # called on the scheduler's delivery thread
        mailbox.post(queue, (kind, value))

    handle = runtime.submit_generation(
        prompt, visual, sink=sink, timeout_s=timeout_s, images=images, **options
    )

    async def pieces() -> AsyncGenerator[str, None]:
        after: tuple[str, Any] | None = None  # an end or error read behind pieces
        try:
            while True:
                kind, value = after or await queue.get()
                after = None
                if kind == "piece":
                    # Pieces that arrived together (a client or loop that fell behind the
                    # decoder) go out as one: one write per wake-up, not one per token.
                    text = [value]
                    while not queue.empty():
                        item = queue.get_nowait()
                        if item[0] != "piece":
                            after = item
                            break
                        text.append(item[1])
                    yield "".join(text)
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
