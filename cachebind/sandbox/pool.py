"""The parent's side of the sandbox: the pool of workers, its queue and its dispatchers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import pickle
import queue
import signal
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from cachebind.config import SandboxConfig
from cachebind.errors import CachebindError, InputError
from cachebind.sandbox import zygote
from cachebind.sandbox.process import WorkerProcess, death_reason, kill_all
from cachebind.sandbox.worker import from_wire, loads, receive

MiB = 1024 * 1024
_POLL_S = 0.05
"""How often a waiting dispatcher looks whether its task was abandoned."""


class SandboxBusy(CachebindError):
    """Every worker is busy and the queue in front of them is full; try again later."""

    def __init__(self, retry_after_s: float, in_flight: int) -> None:
        self.retry_after_s = retry_after_s
        self.in_flight = in_flight
        super().__init__(
            f"decoding is at capacity ({in_flight} inputs in flight); "
            f"retry after {retry_after_s:.0f} s"
        )


class SandboxClosed(CachebindError):
    """The sandbox was closed before the task could finish."""


@dataclass(frozen=True)
class SandboxStats:
    """A moment of the pool, for gauges: ``busy`` workers running a task (or being replaced
    after one: the task's answer does not wait for its successor to start), ``queued`` tasks
    waiting for one, and ``restarts`` of workers since the start, by reason (``crashed``,
    ``memory_cap``, ``cpu_cap``, ``deadline``, ``abandoned``, ``bad_answer``, ``died_idle``)."""

    workers: int
    busy: int
    queued: int
    restarts: dict[str, int]


@dataclass(eq=False)
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    source: str
    timeout: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def abandon(self) -> None:
        """Nobody waits for the answer any more: drop the task if it waits, kill it if it runs."""
        self.abandoned.set()
        self.future.cancel()


class Sandbox:
    """``config.workers`` isolated worker processes behind a queue of ``config.max_queue``.

    Thread-safe; one dispatcher thread per worker sends it a task, waits for the answer, the
    deadline, the worker's death or the task's abandonment, and replaces the worker when needed.
    ``preload`` names modules each worker imports before its memory is capped (their footprint is
    not charged to tasks, and the first task does not pay for the import).
    """

    def __init__(self, config: SandboxConfig, *, preload: Sequence[str] = ()) -> None:
        self.config = config
        self._preload = tuple(preload)
        self._memory = config.memory_mb * MiB if sys.platform.startswith("linux") else None
        # A worker cannot make more than its memory cap (twice, for slack): nor can it make
        # the parent allocate more for its answer.
        self._answer_limit = 2 * config.memory_mb * MiB
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy = 0
        self._restarts: Counter[str] = Counter()
        self._mean_s = 0.1  # running mean of task seconds, for the busy answer's retry hint
        self._closed = False
        self._workers: list[WorkerProcess | None] = [None] * config.workers
        # The template the workers are forked from (shared with the process's other pools).
        self._zygote = [zygote.acquire(self._preload)]
        self._started = [threading.Event() for _ in range(config.workers)]
        self._threads = [
            threading.Thread(target=self._dispatch, args=(i,), name=f"sandbox-{i}", daemon=True)
            for i in range(config.workers)
        ]
        self._finalizer = weakref.finalize(self, _shut_down, self._workers, self._zygote)
        for thread in self._threads:
            thread.start()

    # -- public API ----------------------------------------------------------------------------

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        source: str,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _Task:
        """Queue ``fn(*args, **kwargs)``; the returned task's ``future`` holds the answer.

        Raises :class:`SandboxBusy` when ``workers + max_queue`` tasks are already in flight.
        """
        with self._lock:
            if self._closed:
                raise SandboxClosed("the sandbox is closed")
            if self._in_flight >= self.config.workers + self.config.max_queue:
                raise SandboxBusy(self._retry_after(), self._in_flight)
            self._in_flight += 1
        task = _Task(fn, args, kwargs, source, timeout or self.config.timeout_s)
        task.future.add_done_callback(self._finished)
        self._queue.put(task)
        return task

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        source: str,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)`` in a worker; raises ``InputError`` when it could not finish
        (see the module's table) and ``SandboxBusy`` when the queue is full."""
        task = self.submit(fn, *args, source=source, timeout=timeout, **kwargs)
        try:
            return task.future.result()
        except BaseException:
            task.abandon()  # an interrupted caller: stop the work it no longer waits for
            raise

    async def run_async(
        self,
        fn: Callable[..., Any],
        *args: Any,
        source: str,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``run`` for an event loop: awaits without blocking it. Cancelling the awaiting task
        (a request that timed out, a client gone) kills the worker running it, or drops it
        from the queue."""
        task = self.submit(fn, *args, source=source, timeout=timeout, **kwargs)
        try:
            return await asyncio.wrap_future(task.future)
        except asyncio.CancelledError:
            task.abandon()
            raise

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker has started (imported ``preload``) or ``timeout`` passed;
        True when they all run (a service's readiness probe)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for started in self._started:
            started.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return all(w is not None and w.alive() for w in self._workers)

    @property
    def in_flight(self) -> int:
        """Tasks queued or running."""
        return self._in_flight

    def stats(self) -> SandboxStats:
        with self._lock:
            busy, in_flight, restarts = self._busy, self._in_flight, dict(self._restarts)
        return SandboxStats(self.config.workers, busy, max(0, in_flight - busy), restarts)

    def close(self) -> None:
        """Refuse new tasks, fail queued and running ones with ``SandboxClosed``, stop the
        workers and their dispatchers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(10)
        while True:  # tasks queued behind the stop markers
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not None and task.future.set_running_or_notify_cancel():
                task.future.set_exception(SandboxClosed("the sandbox was closed"))
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- dispatching ---------------------------------------------------------------------------

    def _finished(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._in_flight -= 1

    def _retry_after(self) -> float:
        return float(max(1, math.ceil(self._in_flight * self._mean_s / self.config.workers)))

    def _spawn(self) -> WorkerProcess:
        template = self._zygote[0]
        try:
            return WorkerProcess(template, self._memory, self.config.cpu_seconds)
        except OSError:  # the template itself died (killed from outside): start another
            with self._lock:
                if self._zygote[0] is template:
                    zygote.release(template)
                    self._zygote[0] = zygote.acquire(self._preload)
            return WorkerProcess(self._zygote[0], self._memory, self.config.cpu_seconds)

    def _dispatch(self, slot: int) -> None:
        with contextlib.suppress(Exception):  # a worker that cannot start is retried per task
            self._workers[slot] = self._spawn()
        self._started[slot].set()
        while True:
            task = self._queue.get()
            if task is None or self._closed:
                if task is not None and task.future.set_running_or_notify_cancel():
                    task.future.set_exception(SandboxClosed("the sandbox was closed"))
                break
            if not task.future.set_running_or_notify_cancel():
                continue  # abandoned while it waited
            started = time.monotonic()
            with self._lock:
                self._busy += 1
            try:
                self._execute(slot, task)
            except BaseException as exc:  # never leave a caller waiting forever
                if not task.future.done():
                    task.future.set_exception(exc)
                with contextlib.suppress(Exception):
                    self._replace(slot, "crashed")
            finally:
                with self._lock:
                    self._busy -= 1
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)
        worker, self._workers[slot] = self._workers[slot], None
        if worker is not None:
            worker.stop()

    def _replace(self, slot: int, reason: str | None = None) -> WorkerProcess | None:
        """Kill the slot's worker and start its successor now, while the slot is idle anyway,
        so that the next task does not wait for a fork. ``reason`` is counted
        in ``stats().restarts`` when a worker was there to replace."""
        worker, self._workers[slot] = self._workers[slot], None
        if worker is not None:
            worker.kill()
            if reason is not None:
                with self._lock:
                    self._restarts[reason] += 1
        if not self._closed:
            self._workers[slot] = self._spawn()
        return self._workers[slot]

    def _ready_worker(self, slot: int) -> WorkerProcess:
        worker = self._workers[slot]
        if worker is None or not worker.alive():
            worker = self._replace(slot, "died_idle")
        if worker is None:
            raise SandboxClosed("the sandbox was closed")
        return worker

    def _execute(self, slot: int, task: _Task) -> None:
        message = pickle.dumps((task.fn, task.args, task.kwargs), protocol=5)
        worker = self._ready_worker(slot)
        try:
            worker.conn.send_bytes(message)
        except OSError:  # it died while idle: not this task's doing, give it a fresh one
            successor = self._replace(slot, "died_idle")
            if successor is None:
                raise SandboxClosed("the sandbox was closed") from None
            worker = successor
            worker.conn.send_bytes(message)
        deadline = time.monotonic() + task.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f"decoding took longer than {task.timeout:g} s"
                task.future.set_exception(InputError(task.source, "too_slow", detail))
                self._replace(slot, "deadline")
                return
            ready = wait([worker.conn], timeout=min(remaining, _POLL_S))
            if task.abandoned.is_set() or self._closed:
                task.future.set_exception(SandboxClosed("the task was abandoned"))
                self._replace(slot, "abandoned" if not self._closed else None)
                return
            if not ready:
                continue
            try:
                answer = receive(worker.conn, max(remaining, _POLL_S), self._answer_limit)
            except (EOFError, OSError):
                exitcode = worker.exitcode()
                task.future.set_exception(self._crash_error(task.source, exitcode))
                self._replace(slot, death_reason(exitcode))
                return
            except Exception as exc:  # late, oversized or garbled: not trusted again
                self._replace(slot)
                detail = f"the decoder's answer was refused: {exc}"
                task.future.set_exception(InputError(task.source, "undecodable", detail))
                return
            self._answer(slot, task, answer)
            return

    def _answer(self, slot: int, task: _Task, answer: tuple[bytes, list[Any]]) -> None:
        try:
            kind, value = loads(*answer)
        except Exception as exc:
            detail = f"the decoder's answer was refused: {exc}"
            task.future.set_exception(InputError(task.source, "undecodable", detail))
            # A worker that sends what it should not is not trusted again.
            self._replace(slot, "bad_answer")
            return
        if kind == "ok":
            task.future.set_result(from_wire(value))
        elif kind == "input_error":
            reason, detail = value
            task.future.set_exception(InputError(task.source, reason, detail))
        elif kind == "memory":
            detail = f"decoding needs more than the {self.config.memory_mb} MiB allowed"
            task.future.set_exception(InputError(task.source, "too_large", detail))
            self._replace(slot, "memory_cap")
        else:
            task.future.set_exception(InputError(task.source, "undecodable", str(value)))

    def _crash_error(self, source: str, exitcode: int | None) -> InputError:
        if exitcode is not None and exitcode < 0:
            try:
                sig = signal.Signals(-exitcode)
            except ValueError:
                return InputError(source, "undecodable", f"the decoder died of signal {-exitcode}")
            if sig == signal.SIGXCPU:
                detail = f"decoding used more than {self.config.cpu_seconds} CPU-seconds"
                return InputError(source, "too_slow", detail)
            if sig == signal.SIGKILL:
                detail = "the decoder was killed (SIGKILL), most likely for running out of memory"
                return InputError(source, "too_large", detail)
            return InputError(source, "undecodable", f"the decoder crashed with signal {sig.name}")
        return InputError(source, "undecodable", f"the decoder exited with status {exitcode}")


def _shut_down(workers: list[WorkerProcess | None], template: list[zygote.Zygote]) -> None:
    """The pool's finalizer: no worker outlives its pool, and the template is let go."""
    kill_all(workers)
    zygote.release(template[0])
