"""A pool of worker processes that run decoders on untrusted bytes, so that a decoder which
crashes, eats memory or spins costs one task its answer and nothing else.

    with Sandbox(settings.sandbox, preload=("cachebind.preprocess",)) as sandbox:
        pixels = sandbox.run(decode_fn, data, source="upload.png")       # sync
        pixels = await sandbox.run_async(decode_fn, data, source="x")    # from an event loop

Each worker is a freshly spawned interpreter (``sys.executable``, never a fork of a parent that
holds threads, locks or CUDA state; nor ``multiprocessing``'s spawn, which would re-run the
parent's main script in it), joined to the parent by a socket pair, with
- ``RLIMIT_AS`` = its idle footprint + ``memory_mb`` (an allocation past it raises
  ``MemoryError`` in the worker, or the kernel kills it),
- ``RLIMIT_CPU`` = the CPU time it has used + ``cpu_seconds``, renewed per task (the kernel
  sends ``SIGXCPU`` past it),
- ``RLIMIT_CORE`` = 0 (a crash leaves no core file behind),
and the parent enforces a wall-clock deadline per task. A worker that crashes, passes a cap,
overruns or whose task is abandoned (a cancelled ``run_async``) is killed and replaced; its task
raises ``InputError(source, reason, detail)``:

=================  =============================================================
``undecodable``    the worker died of a signal (``SIGSEGV``, ``SIGABRT`` …, named in the
                   detail) or exited, or ``fn`` raised something other than InputError
``too_large``      ``MemoryError`` under the memory cap, or killed by ``SIGKILL`` (OOM)
``too_slow``       past the deadline, or past the CPU cap (``SIGXCPU``)
=================  =============================================================

An ``InputError`` raised by ``fn`` itself comes back as it was raised. In front of the workers
is a bounded queue: a task submitted while ``workers + max_queue`` tasks are in flight raises
:class:`SandboxBusy` at once, carrying ``retry_after_s`` (an HTTP service answers 429).

``fn`` must be importable by name (a module-level function such as
``cachebind.preprocess.preprocess``): it travels by reference, its arguments by pickle. Results
come back pickled (protocol 5, one copy of an array's bytes each way: well under a millisecond
for a [3, 224, 224] float32 tensor); torch tensors travel as numpy arrays and are rebuilt with
``torch.from_numpy``. The parent unpickles results with an allow-list (plain Python data and
numpy arrays), so a worker whose decoder was subverted by a crafted input cannot make the parent
run code through its answer. The sandbox bounds resources and contains crashes; it is not a
system-call filter (a subverted worker could still read files the service can read).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import io
import json
import math
import os
import pickle
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from cachebind.config import SandboxConfig
from cachebind.errors import CachebindError, InputError

MiB = 1024 * 1024
_POLL_S = 0.05
"""How often a waiting dispatcher looks whether its task was abandoned."""
_START_TIMEOUT_S = 60.0


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


# -- the worker process ------------------------------------------------------------------------


def _worker_entry(spec: str) -> None:
    """``python -c`` of a new worker: ``spec`` is JSON (socket fd, caps, preload, sys.path)."""
    args = json.loads(spec)
    sys.path[:0] = [p for p in args["path"] if p not in sys.path]
    conn = Connection(args["fd"])
    _worker_main(conn, args["memory"], args["cpu"], args["preload"])


def _worker_main(
    conn: Connection, memory_bytes: int | None, cpu_seconds: int, preload: Sequence[str]
) -> None:
    """A worker's life: apply the caps, then run tasks until the parent closes the socket."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name in preload:
        importlib.import_module(name)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)  # one task at a time: parallelism is the pool's
    if memory_bytes is not None:
        _cap_memory(memory_bytes)
    conn.send_bytes(b"ready")  # a task's deadline starts now, not while the interpreter starts
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not message:  # the parent's stop
            return
        _renew_cpu_cap(cpu_seconds)
        outcome = _call(message)
        try:
            conn.send_bytes(_dumps(outcome))
        except MemoryError:
            conn.send_bytes(_dumps(("memory", None)))
        except (EOFError, OSError):
            return
        except Exception as exc:  # an unpicklable result: the task's bug, not the worker's
            conn.send_bytes(_dumps(("error", f"result cannot be sent back: {exc!r}")))
        if outcome[0] == "memory":
            return  # a heap that hit its cap may be fragmented or half-updated: start afresh


def _call(message: bytes) -> tuple[str, Any]:
    try:
        fn, args, kwargs = pickle.loads(message)
        return ("ok", _to_wire(fn(*args, **kwargs)))
    except InputError as exc:
        return ("input_error", (exc.reason, exc.detail))
    except MemoryError:
        return ("memory", None)
    except Exception as exc:
        return ("error", f"{type(exc).__name__}: {exc}")


def _dumps(outcome: tuple[str, Any]) -> bytes:
    return pickle.dumps(outcome, protocol=5)


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent process dies (a worker busy in a long
    decode would otherwise notice only when it next reads the pipe)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _cap_memory(extra_bytes: int) -> None:
    """``RLIMIT_AS`` = what the worker maps now (interpreter, preloaded modules) + the budget:
    a cap on what a task may add, whatever the libraries' own footprint."""
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        mapped = 0
    limit = mapped + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _renew_cpu_cap(cpu_seconds: int) -> None:
    """``RLIMIT_CPU`` counts over the process's life: grant each task ``cpu_seconds`` more."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = math.ceil(usage.ru_utime + usage.ru_stime)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = used + cpu_seconds
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _to_wire(value: Any) -> Any:
    """Torch tensors as numpy arrays (the parent's allow-list admits numpy, not torch's
    pickles, which may run ``torch.load``)."""
    if type(value).__module__.startswith("torch") and hasattr(value, "numpy"):
        return _Tensor(value.detach().cpu().contiguous().numpy())
    if isinstance(value, list | tuple):
        return type(value)(_to_wire(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


class _Tensor(tuple):
    """A tensor on the wire: ``(numpy_array,)``, rebuilt by the parent."""

    def __new__(cls, array: Any) -> _Tensor:
        return super().__new__(cls, (array,))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Tensor, (self[0],))


def _from_wire(value: Any) -> Any:
    if isinstance(value, _Tensor):
        import torch

        return torch.from_numpy(value[0])
    if isinstance(value, list | tuple):
        return type(value)(_from_wire(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_wire(v) for k, v in value.items()}
    return value


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    (__name__, "_Tensor"),
}


class _AnswerUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"a worker answered with a {module}.{name}")
        return super().find_class(module, name)


def _loads(data: bytes) -> tuple[str, Any]:
    return _AnswerUnpickler(io.BytesIO(data)).load()


# -- the parent's side -------------------------------------------------------------------------


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


class _Worker:
    """One worker: a fresh interpreter (``sys.executable -c``) joined by a socket pair.

    Not ``multiprocessing``'s spawn or forkserver: both re-run the parent's main script in the
    child (a Ray worker's, a user's script), which a library cannot vouch for.
    """

    def __init__(self, memory_bytes: int | None, cpu_s: int, preload: Sequence[str]) -> None:
        ours, theirs = socket.socketpair()
        spec = {
            "fd": theirs.fileno(),
            "memory": memory_bytes,
            "cpu": cpu_s,
            "preload": list(preload),
            "path": [p for p in sys.path if p],
        }
        env = {**os.environ, **_ONE_THREAD}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _ENTRY, json.dumps(spec)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # stderr stays: a dying decoder's last words
                env=env,
                close_fds=True,
            )
        finally:
            theirs.close()  # the worker's end: its death must show here as EOF
        self.conn = Connection(ours.detach())
        try:
            if not self.conn.poll(_START_TIMEOUT_S) or self.conn.recv_bytes() != b"ready":
                raise OSError("no ready message")
        except (OSError, EOFError) as exc:
            self.kill()
            raise RuntimeError(f"a sandbox worker did not start: {exc}") from exc

    def alive(self) -> bool:
        return self.process.poll() is None

    def exitcode(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.process.wait(5)
        return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send_bytes(b"")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(2)
        self.kill()


_ENTRY = "import sys; from cachebind.sandbox import _worker_entry; _worker_entry(sys.argv[1])"
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
"""A worker runs one task at a time: the pool is the parallelism, not BLAS threads."""


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
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_s = 0.1  # running mean of task seconds, for the busy answer's retry hint
        self._closed = False
        self._workers: list[_Worker | None] = [None] * config.workers
        self._threads = [
            threading.Thread(target=self._dispatch, args=(i,), name=f"sandbox-{i}", daemon=True)
            for i in range(config.workers)
        ]
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
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

    @property
    def in_flight(self) -> int:
        """Tasks queued or running."""
        return self._in_flight

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

    def _spawn(self) -> _Worker:
        return _Worker(self._memory, self.config.cpu_seconds, self._preload)

    def _dispatch(self, slot: int) -> None:
        with contextlib.suppress(Exception):  # a worker that cannot start is retried per task
            self._workers[slot] = self._spawn()
        while True:
            task = self._queue.get()
            if task is None or self._closed:
                if task is not None and task.future.set_running_or_notify_cancel():
                    task.future.set_exception(SandboxClosed("the sandbox was closed"))
                break
            if not task.future.set_running_or_notify_cancel():
                continue  # abandoned while it waited
            started = time.monotonic()
            try:
                self._execute(slot, task)
            except BaseException as exc:  # never leave a caller waiting forever
                if not task.future.done():
                    task.future.set_exception(exc)
                with contextlib.suppress(Exception):
                    self._replace(slot)
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - started)
        worker, self._workers[slot] = self._workers[slot], None
        if worker is not None:
            worker.stop()

    def _replace(self, slot: int) -> _Worker | None:
        """Kill the slot's worker and start its successor now, while the slot is idle anyway,
        so that the next task does not wait for an interpreter to start."""
        worker, self._workers[slot] = self._workers[slot], None
        if worker is not None:
            worker.kill()
        if not self._closed:
            self._workers[slot] = self._spawn()
        return self._workers[slot]

    def _ready_worker(self, slot: int) -> _Worker:
        worker = self._workers[slot]
        if worker is None or not worker.alive():
            worker = self._replace(slot)
        if worker is None:
            raise SandboxClosed("the sandbox was closed")
        return worker

    def _execute(self, slot: int, task: _Task) -> None:
        message = pickle.dumps((task.fn, task.args, task.kwargs), protocol=5)
        worker = self._ready_worker(slot)
        try:
            worker.conn.send_bytes(message)
        except OSError:  # it died while idle: not this task's doing, give it a fresh one
            worker = self._replace(slot)
            if worker is None:
                raise SandboxClosed("the sandbox was closed") from None
            worker.conn.send_bytes(message)
        deadline = time.monotonic() + task.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._replace(slot)
                detail = f"decoding took longer than {task.timeout:g} s"
                task.future.set_exception(InputError(task.source, "too_slow", detail))
                return
            ready = wait([worker.conn], timeout=min(remaining, _POLL_S))
            if task.abandoned.is_set() or self._closed:
                self._replace(slot)
                task.future.set_exception(SandboxClosed("the task was abandoned"))
                return
            if not ready:
                continue
            try:
                data = worker.conn.recv_bytes()
            except (EOFError, OSError):
                exitcode = worker.exitcode()
                self._replace(slot)
                task.future.set_exception(self._crash_error(task.source, exitcode))
                return
            self._answer(slot, task, data)
            return

    def _answer(self, slot: int, task: _Task, data: bytes) -> None:
        try:
            kind, value = _loads(data)
        except Exception as exc:
            self._replace(slot)  # a worker that sends what it should not is not trusted again
            detail = f"the decoder's answer was refused: {exc}"
            task.future.set_exception(InputError(task.source, "undecodable", detail))
            return
        if kind == "ok":
            task.future.set_result(_from_wire(value))
        elif kind == "input_error":
            reason, detail = value
            task.future.set_exception(InputError(task.source, reason, detail))
        elif kind == "memory":
            self._replace(slot)
            detail = f"decoding needs more than the {self.config.memory_mb} MiB allowed"
            task.future.set_exception(InputError(task.source, "too_large", detail))
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


def _kill_all(workers: list[_Worker | None]) -> None:
    for worker in list(workers):
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.kill()
