"""One sandbox worker process: forked by its template, joined by a socket pair, and how it
ends."""

from __future__ import annotations

import contextlib
import os
import signal
from multiprocessing.connection import Connection

from cachebind.sandbox.zygote import Zygote, read_status

_START_TIMEOUT_S = 60.0


class WorkerProcess:
    """One worker, forked by ``zygote`` (a template interpreter that imported the preload).

    Not ``multiprocessing``'s spawn or forkserver: both re-run the parent's main script in the
    child (a Ray worker's, a user's script), which a library cannot vouch for. Not a fork of the
    parent either, which holds threads, locks or CUDA state. The worker is the template's
    child, so its exit status comes from the template, on the worker's status pipe.
    """

    def __init__(self, zygote: Zygote, memory_bytes: int | None, cpu_s: int) -> None:
        forked = zygote.fork(memory_bytes, cpu_s)
        self.pid = forked.pid
        self.conn = Connection(forked.conn_fd)
        self._status_fd: int | None = forked.status_fd
        self._ended = False
        self._exitcode: int | None = None
        try:
            if not self.conn.poll(_START_TIMEOUT_S) or self.conn.recv_bytes() != b"ready":
                raise OSError("no ready message")
        except (OSError, EOFError) as exc:
            self.kill()
            raise RuntimeError(f"a sandbox worker did not start: {exc}") from exc

    def _poll(self, timeout: float | None) -> bool:
        """Whether it has ended (its status read, if the template reported one)."""
        if not self._ended and self._status_fd is not None:
            self._ended, self._exitcode = read_status(self._status_fd, timeout)
            if self._ended:
                os.close(self._status_fd)
                self._status_fd = None
        return self._ended

    def alive(self) -> bool:
        return not self._poll(0)

    def exitcode(self) -> int | None:
        """Its exit status (``-signal`` when a signal ended it); None if it is still running
        after 5 s or its template died without telling."""
        self._poll(5)
        return self._exitcode

    def kill(self) -> None:
        if not self._poll(0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._poll(5)
        self.conn.close()
        if self._status_fd is not None:  # the template did not answer in time
            os.close(self._status_fd)
            self._status_fd = None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send_bytes(b"")
        self._poll(2)
        self.kill()


def death_reason(exitcode: int | None) -> str:
    """The restart reason a dead worker's exit status stands for (a ``SandboxStats`` key)."""
    if exitcode == -signal.SIGXCPU:
        return "cpu_cap"
    if exitcode == -signal.SIGKILL:
        return "memory_cap"  # the kernel's OOM killer; nobody else sends a worker SIGKILL
    return "crashed"


def kill_all(workers: list[WorkerProcess | None]) -> None:
    """Kill every started worker (the pool's finalizer: no worker outlives its pool)."""
    for worker in list(workers):
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.kill()
