"""One sandbox worker process: a fresh interpreter joined by a socket pair, and how it ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection

_ENTRY = "import sys; from cachebind.sandbox.worker import worker_entry; worker_entry(sys.argv[1])"
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
"""A worker runs one task at a time: the pool is the parallelism, not BLAS threads."""
_START_TIMEOUT_S = 60.0


class WorkerProcess:
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
