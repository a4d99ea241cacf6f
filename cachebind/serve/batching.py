"""Micro-batching: concurrent requests share one encoder / index call.

Each ``MicroBatcher`` owns a queue. The first item of an empty queue opens a window of
``window_ms``; every item submitted before it closes (or until ``max_batch`` items) goes into the
same call of ``fn``, which runs in a worker thread so the event loop keeps accepting requests.
Each caller awaits its own future: one result, or the exception that concerns it alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class ItemError(Exception):
    """Wraps an exception that belongs to one item of a batch (the others still succeed)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Pending(Generic[Item]):
    item: Item
    future: asyncio.Future[Any]


class MicroBatcher(Generic[Item, Result]):
    """Collects items for ``window_ms`` or until ``max_batch``, then runs ``fn(items)`` once.

    When nothing is running and nothing else waits, the first item goes at once (no window):
    batching then comes from the requests that arrive while a batch runs.

    ``fn`` returns one result per item, in order; a result that is an ``ItemError`` fails only
    that item's caller. An exception raised by ``fn`` itself fails the whole batch.
    ``on_batch(size)`` is called for every batch (metrics).
    """

    def __init__(
        self,
        fn: Callable[[list[Item]], Sequence[Result | ItemError]],
        *,
        window_ms: float,
        max_batch: int,
        executor: concurrent.futures.Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        max_inflight: int = 1,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn = fn
        self.window_s = max(window_ms, 0.0) / 1000.0
        self.max_batch = max_batch
        self.executor = executor
        self.on_batch = on_batch
        self.name = name
        self.max_inflight = max_inflight
        self._slots: asyncio.Semaphore | None = None
        self._inflight = 0
        self._queue: asyncio.Queue[_Pending[Item]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.running: set[asyncio.Task[None]] = set()
        """The batches being executed. The event loop keeps only weak references to tasks, so
        a batch nobody else holds could be collected mid-run: held here until done."""
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its result."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or a new event loop (a restarted server): start the collector there.
            self._loop = loop
            self._queue = asyncio.Queue()
            self._slots = asyncio.Semaphore(self.max_inflight)
            self._task = loop.create_task(self._run(), name=f"{self.name}-collector")
        assert self._queue is not None
        future: asyncio.Future[Result] = loop.create_future()
        await self._queue.put(_Pending(item, future))
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
            self._task = None
            self._loop = None

    async def _run(self) -> None:
        assert self._queue is not None and self._slots is not None
        queue, slots = self._queue, self._slots
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            batch = [first]
            # An idle model takes a lone request at once: at low load the window would only add
            # latency. While a batch runs, requests queue up and the window lets them gather.
            idle = self._inflight == 0 and queue.empty()
            deadline = loop.time() + (0.0 if idle else self.window_s)
            while True:
                while len(batch) < self.max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                remaining = deadline - loop.time()
                if len(batch) >= self.max_batch or remaining <= 0:
                    break
                # Short sleeps rather than wait_for(queue.get()): a timed-out get can lose an
                # item on some Python versions, and the window is only a few milliseconds.
                await asyncio.sleep(min(remaining, 0.001))
            # While earlier batches hold every slot, requests keep queueing: the next batch
            # grows with the load instead of piling many small batches on a busy model.
            await slots.acquire()
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            # Callers that gave up (timeout, disconnect) need no work done for them.
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                slots.release()
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            self._inflight += 1
            # Run the batch without blocking the collection of the next one.
            task = loop.create_task(self._execute(batch), name=f"{self.name}-batch")
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _execute(self, batch: list[_Pending[Item]]) -> None:
        assert self._slots is not None
        try:
            await self._call(batch)
        finally:
            self._inflight -= 1
            self._slots.release()

    async def _call(self, batch: list[_Pending[Item]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self.fn, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: {len(results)} results for a batch of {len(batch)}"
                )
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for p, result in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, ItemError):
                p.future.set_exception(result.error)
            else:
                p.future.set_result(result)
