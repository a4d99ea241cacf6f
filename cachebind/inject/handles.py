"""What a caller of the generation scheduler holds: the request's handle, the sink it reports
to, and the observer protocol through which the scheduler reports its load."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from cachebind.errors import CachebindError, GenerationBusy

Sink = Callable[[str, Any], None]
"""Receives ("piece", str), then ("end", finish_reason) or ("error", exception)."""


SchedulerBusy = GenerationBusy  # the queue is full (defined without torch, for the service)

_burst = threading.local()


@contextmanager
def one_wakeup() -> Iterator[None]:
    """Sinks called inside defer their callers' wake-ups (``wake_later``) to its end, where
    each distinct wake-up runs once: one per event loop per decode step, however many rows."""
    wakes: dict[object, Callable[[], None]] = {}
    _burst.wakes = wakes
    try:
        yield
    finally:
        _burst.wakes = None
        for wake in wakes.values():
            wake()


def wake_later(key: object, wake: Callable[[], None]) -> bool:
    """Run ``wake`` once at the end of the current ``one_wakeup`` burst of this thread;
    False (nothing deferred) outside one, where the caller wakes now."""
    wakes = getattr(_burst, "wakes", None)
    if wakes is None:
        return False
    wakes.setdefault(key, wake)
    return True


class GenerationTimeout(CachebindError, TimeoutError):
    """A request passed its deadline; its slot was freed."""


class SchedulerObserver(Protocol):
    """Where the scheduler reports its load (the service's Prometheus metrics)."""

    def scheduler_state(self, queued: int, running: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def tokens(self, n: int) -> None: ...

    def finished(self, reason: str) -> None: ...


class NullObserver:
    def scheduler_state(self, queued: int, running: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def tokens(self, n: int) -> None:
        pass

    def finished(self, reason: str) -> None:
        pass


class GenerationHandle:
    """One submitted request: iterate it for text pieces (unless a ``sink`` was given);
    ``cancel`` frees its slot at the next step."""

    def __init__(self, sink: Sink | None) -> None:
        self._events: queue.SimpleQueue[tuple[str, Any]] | None = None
        if sink is None:
            events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
            self._events = events
            sink = lambda kind, value: events.put((kind, value))  # noqa: E731
        self.sink = sink
        self.cancelled = threading.Event()
        self.tokens: list[int] = []  # the generated ids (complete once the request ended)
        self.prompt_tokens = 0  # the prompt's length in tokens, as it was fed (template, BOS)
        self.finish_reason: str | None = None
        self.first_token_s: float | None = None  # from submission to the first sampled token

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        if self._events is None:
            raise TypeError("this request reports to its sink")
        try:
            while True:
                kind, value = self._events.get()
                if kind == "piece":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:  # also when the consumer stops early: its slot goes back
            self.cancel()


__all__ = [
    "GenerationHandle",
    "GenerationTimeout",
    "SchedulerBusy",
    "SchedulerObserver",
    "Sink",
    "one_wakeup",
    "wake_later",
]
