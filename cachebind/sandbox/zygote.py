"""Where sandbox workers come from: a template interpreter that has imported the preload and
forks a worker on request.

Starting an interpreter and importing torch, PIL and PyAV costs about 2 CPU-seconds; a worker
is replaced after every crash, cap or deadline, so hostile input would otherwise buy 2 s of
CPU per bad file. The template (the "zygote", as Android calls its own) is a fresh interpreter
started like a worker used to be (``sys.executable -c``, never a fork of the parent, which holds
threads, locks or CUDA state), single-threaded, that never runs a task: it imports the preload
once, then forks one worker per request, in about 10 ms. Each worker applies its own caps
after the fork, as before, and its ``RLIMIT_CPU`` counts from the fork.

The wire, one control socket per template:
- parent -> template: a request (memory cap, CPU cap);
- template -> parent: the worker's pid with two file descriptors (``SCM_RIGHTS``): the
  worker's end of its socket pair, and the read end of a status pipe on which the template
  writes the worker's exit status (``Popen.returncode``'s convention: ``-signal`` when a
  signal ended it) once it has reaped it. EOF without a status: the template itself died.

The template exits when its control socket closes (its parent ended, or ``close``); a worker
dies with its template (``PR_SET_PDEATHSIG``), so nothing outlives the parent.

One template per (interpreter, preload, ``sys.path``, environment) is shared by the process's
pools: a pool holds it while it runs (``acquire``/``release``); a template no pool holds stays
warm for the next pool until a template of another key is started.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

_ENTRY = "import sys; from cachebind.sandbox.zygote import zygote_entry; zygote_entry(sys.argv[1])"
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
"""A worker runs one task at a time: the pool is the parallelism, not BLAS threads. It also
keeps BLAS libraries from starting thread pools in the template, which must stay single-threaded
for its forks (a fork copies only the forking thread, with whatever locks the others held)."""
_REQUEST = struct.Struct("<qq")  # memory cap in bytes (-1: none), CPU seconds per task
_PID = struct.Struct("<q")
_STATUS = struct.Struct("<i")
_START_TIMEOUT_S = 120.0
"""The template's imports (torch, PIL, PyAV) on a loaded 2-core machine."""


@dataclass(frozen=True)
class Forked:
    """A worker just forked: its pid, its end of the socket pair, its status pipe."""

    pid: int
    conn_fd: int
    status_fd: int


class Zygote:
    """The parent's handle on one template process (thread-safe)."""

    def __init__(
        self, executable: str, preload: Sequence[str], path: Sequence[str], env: dict[str, str]
    ) -> None:
        self._spec = {"preload": list(preload), "path": list(path)}
        self._command = [executable, "-c", _ENTRY]
        self._env = {**env, **_ONE_THREAD}
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.users = 0

    def _start(self) -> socket.socket:
        """Start the template and wait for its imports (the first fork pays for them)."""
        ours, theirs = socket.socketpair()
        spec = {**self._spec, "fd": theirs.fileno()}
        try:
            self.process = subprocess.Popen(
                [*self._command, json.dumps(spec)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # stderr stays: a dying decoder's last words
                env=self._env,
                close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(_START_TIMEOUT_S)
        try:
            if _recv_exactly(ours, 5) != b"ready":
                raise OSError("the worker template did not start")
        except OSError:  # a timeout too: the half-started template goes
            ours.close()
            self.process.kill()
            self.process.wait()
            raise
        self._sock = ours
        return ours

    def alive(self) -> bool:
        """Not known to be dead (a template that was never started counts as alive)."""
        return self.process is None or self.process.poll() is None

    def fork(self, memory_bytes: int | None, cpu_s: int) -> Forked:
        """A new worker (it applies its caps, then says ``ready`` on its socket)."""
        with self._lock:
            sock = self._sock if self._sock is not None else self._start()
            sock.sendall(_REQUEST.pack(-1 if memory_bytes is None else memory_bytes, cpu_s))
            data, fds, _, _ = socket.recv_fds(sock, _PID.size, 2)
            if len(data) != _PID.size or len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                raise OSError("the worker template ended")
            (pid,) = _PID.unpack(data)
            return Forked(pid, fds[0], fds[1])

    def close(self) -> None:
        """Close the control socket: the template exits, and with it any worker it forked."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self.process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
            return
        self.process.kill()
        self.process.wait()


_LOCK = threading.Lock()
_TEMPLATES: dict[tuple[object, ...], Zygote] = {}


def acquire(preload: Sequence[str]) -> Zygote:
    """The live template for ``preload`` under this process's ``sys.path`` and environment,
    started if there is none; the caller ``release``s it when its pool closes."""
    path = tuple(p for p in sys.path if p)
    env = dict(os.environ)
    key = (os.getpid(), sys.executable, tuple(preload), path, tuple(sorted(env.items())))
    with _LOCK:
        zygote = _TEMPLATES.get(key)
        if zygote is None or not zygote.alive():
            if zygote is not None:
                zygote.close()
            # An unused template of another key stays only until a new one is needed.
            for other_key, other in list(_TEMPLATES.items()):
                if other.users == 0 and other_key != key:
                    del _TEMPLATES[other_key]
                    other.close()
            zygote = _TEMPLATES[key] = Zygote(sys.executable, preload, path, env)
        zygote.users += 1
        return zygote


def release(zygote: Zygote) -> None:
    with _LOCK:
        zygote.users = max(0, zygote.users - 1)
        if not zygote.alive():
            for key, value in list(_TEMPLATES.items()):
                if value is zygote:
                    del _TEMPLATES[key]


# -- the template's side -----------------------------------------------------------------------


def zygote_entry(spec: str) -> None:
    """``python -c`` of a new template: import the preload, then fork workers on request."""
    import importlib

    args = json.loads(spec)
    sys.path[:0] = [p for p in args["path"] if p not in sys.path]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    ctrl = socket.socket(fileno=args["fd"])
    for name in args["preload"]:
        importlib.import_module(name)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    status_pipes: dict[int, int] = {}  # worker pid -> write end of its status pipe
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd is written
    ctrl.sendall(b"ready")
    events = selectors.DefaultSelector()
    events.register(ctrl, selectors.EVENT_READ, "ctrl")
    events.register(wake_r, selectors.EVENT_READ, "child")
    while True:
        for key, _ in events.select():
            if key.data == "child":
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    os.read(wake_r, 4096)
                _reap(status_pipes)
                continue
            request = _recv_exactly(ctrl, _REQUEST.size)
            if request is None:  # the parent closed the socket: its workers die with us
                os._exit(0)
            memory, cpu_s = _REQUEST.unpack(request)
            _fork_worker(ctrl, status_pipes, (wake_r, wake_w), memory, cpu_s)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        with contextlib.suppress(InterruptedError):
            chunk = sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
    return data


def _fork_worker(
    ctrl: socket.socket,
    status_pipes: dict[int, int],
    wake: tuple[int, int],
    memory: int,
    cpu_s: int,
) -> None:
    ours, theirs = socket.socketpair()
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: nothing of the template's but the imports
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (*wake, status_r, status_w, *status_pipes.values()):
                os.close(fd)
            ctrl.close()
            ours.close()
            _reseed()
            from multiprocessing.connection import Connection

            from cachebind.sandbox.worker import run_worker

            run_worker(Connection(theirs.detach()), None if memory < 0 else memory, cpu_s)
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    status_pipes[pid] = status_w
    try:
        socket.send_fds(ctrl, [_PID.pack(pid)], [ours.fileno(), status_r])
    finally:
        ours.close()
        os.close(status_r)


def _reap(status_pipes: dict[int, int]) -> None:
    """Tell each ended worker's parent how it ended (then close its pipe: EOF after the status)."""
    while status_pipes:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status_pipes.pop(pid, None)
        if fd is None:
            continue
        code = os.waitstatus_to_exitcode(status)  # -signal when a signal ended it
        with contextlib.suppress(OSError):
            os.write(fd, _STATUS.pack(code))
        os.close(fd)


def _reseed() -> None:
    """A fork shares its template's random state: each worker draws its own."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def read_status(fd: int, timeout: float | None) -> tuple[bool, int | None]:
    """(ended, exit status) from a worker's status pipe: (False, None) while it runs, (True,
    None) when its template died without reporting it."""
    import select

    readable, _, _ = select.select([fd], [], [], timeout)
    if not readable:
        return False, None
    data = os.read(fd, _STATUS.size)
    return True, (_STATUS.unpack(data)[0] if len(data) == _STATUS.size else None)
