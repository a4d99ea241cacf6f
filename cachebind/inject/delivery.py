"""The scheduler's second thread: it turns each step's new tokens into text and hands the
pieces, ends and errors to the requests' sinks, so that detokenising and waking the callers
stay off the decode step's critical path.

The scheduler posts one list per step of ``Delivery`` entries; they are handled in order (a
request's pieces always come before its end), inside one ``one_wakeup`` burst, so that every
caller on one event loop is woken once per step, not once per row and token.

A request with stop strings is the exception: whether it ends depends on its text, so the
scheduler decodes that row itself (``text_of``) to end it at the step its stop string
appears; the delivery then cuts its text at the same place.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from cachebind.inject.handles import GenerationHandle, SchedulerObserver, one_wakeup

log = logging.getLogger(__name__)


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class Deliverable(Protocol):
    """What a delivery needs of a scheduled request."""

    handle: GenerationHandle
    stop: tuple[str, ...]
    emitted: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """Send ``row``'s text up to its first ``count`` tokens; then, if ``end`` is set, end it
    (a finish reason, or the exception to raise at the caller)."""

    row: Deliverable
    count: int
    end: str | BaseException | None = None


def text_of(tokenizer: Decoder, row: Deliverable, count: int) -> tuple[str, bool]:
    """The row's text up to ``count`` tokens, cut before its first stop string, and whether
    a stop string was found."""
    text = tokenizer.decode(row.handle.tokens[:count])
    stopped = False
    for s in row.stop:
        at = text.find(s, max(0, len(row.emitted) - len(s)))
        if at >= 0:
            text, stopped = text[:at], True
    return text, stopped


class DeliveryThread:
    """Detokenises and calls sinks for the scheduler, one step's list at a time."""

    def __init__(self, tokenizer: Decoder, observer: SchedulerObserver) -> None:
        self.tokenizer = tokenizer
        self.observer = observer
        self._queue: queue.SimpleQueue[list[Delivery] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cachebind-delivery", daemon=True)
        self._thread.start()

    def post(self, step: list[Delivery]) -> None:
        if step:
            self._queue.put(step)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            step = self._queue.get()
            if step is None:
                return
            with one_wakeup():
                for item in step:
                    try:
                        self._deliver(item)
                    except Exception:  # one caller's failing sink must not silence the rest
                        log.exception("delivering a generation's text failed")

    def _deliver(self, item: Delivery) -> None:
        row, end = item.row, item.end
        final = end is not None
        if not isinstance(end, BaseException):
            text, stopped = text_of(self.tokenizer, row, item.count)
            if not (final or stopped) and text.endswith("\ufffd"):  # half a character: wait
                text = text.rstrip("\ufffd")
            if text.startswith(row.emitted) and len(text) > len(row.emitted):
                row.handle.sink("piece", text[len(row.emitted) :])
                row.emitted = text
        if final:
            self._end(row.handle, end)

    def _end(self, handle: GenerationHandle, end: str | BaseException | None) -> None:
        reason = "error" if isinstance(end, BaseException) else str(end)
        handle.finish_reason = reason
        self.observer.finished(reason)
        handle.sink(*(("error", end) if isinstance(end, BaseException) else ("end", end)))


def ended(handle: GenerationHandle, end: Any) -> Delivery:
    """A delivery that only ends a request that never got a row (cancelled in the queue)."""
    return Delivery(_Bare(handle), 0, end)


@dataclass(eq=False)
class _Bare:
    handle: GenerationHandle
    stop: tuple[str, ...] = ()
    emitted: str = ""
