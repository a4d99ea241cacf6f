"""The worker's side of the sandbox: caps, the task loop, and the wire format of answers.

Runs in a fork of the worker template (``zygote``), which imported the preload.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import resource
import signal
import struct
import sys
from multiprocessing.connection import Connection
from typing import Any

from cachebind.errors import InputError


def run_worker(conn: Connection, memory_bytes: int | None, cpu_seconds: int) -> None:
    """A worker's life, in a fork of its template (``zygote``), whose imports it has: apply
    the caps, then run tasks until the parent closes the socket."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
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
            send(conn, outcome)
        except MemoryError:
            send(conn, ("memory", None))
        except (EOFError, OSError):
            return
        except Exception as exc:  # an unpicklable result: the task's bug, not the worker's
            send(conn, ("error", f"result cannot be sent back: {exc!r}"))
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


OUT_OF_BAND_BYTES = 64 * 1024
"""Byte strings at least this long travel beside the pickle (pickle protocol 5 out-of-band
buffers, one socket message each), never copied into it; so do numpy arrays."""
_COUNT = struct.Struct("<I")
_BUFFER = struct.Struct("<Q?")  # size, read-only


def send(conn: Connection, outcome: tuple[str, Any]) -> None:
    """One answer: a first message (buffer count, sizes, the pickle), then each buffer."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(outcome, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = b"".join(_BUFFER.pack(r.nbytes, r.readonly) for r in raws)
    conn.send_bytes(_COUNT.pack(len(raws)) + sizes + head)
    for raw in raws:
        conn.send_bytes(raw)


def receive(conn: Connection, timeout: float, limit: int) -> tuple[bytes, list[Any]]:
    """The parent's side of ``send``: the pickle and its buffers (read-only ones as ``bytes``,
    writable ones as ``bytearray``, so numpy arrays come back writable). Raises
    ``TimeoutError`` when a buffer is late, ``ValueError`` past ``limit`` bytes in all."""
    first = conn.recv_bytes(limit)
    (count,) = _COUNT.unpack_from(first)
    meta = [_BUFFER.unpack_from(first, _COUNT.size + i * _BUFFER.size) for i in range(count)]
    if sum(size for size, _ in meta) > limit:
        raise ValueError(f"an answer of more than {limit} bytes")
    head = first[_COUNT.size + count * _BUFFER.size :]
    buffers: list[Any] = []
    for size, readonly in meta:
        if not conn.poll(timeout):
            raise TimeoutError("the rest of the answer did not come")
        if readonly:
            data: Any = conn.recv_bytes(size)
        else:
            data = bytearray(size)
            if conn.recv_bytes_into(data) != size:
                raise ValueError("a buffer of another size than announced")
        buffers.append(data)
    return head, buffers


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
    if isinstance(value, bytes) and len(value) >= OUT_OF_BAND_BYTES:
        return pickle.PickleBuffer(value)
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


def from_wire(value: Any) -> Any:
    if isinstance(value, _Tensor):
        import torch

        return torch.from_numpy(value[0])
    if isinstance(value, list | tuple):
        return type(value)(from_wire(v) for v in value)
    if isinstance(value, dict):
        return {k: from_wire(v) for k, v in value.items()}
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


def loads(head: bytes, buffers: list[Any]) -> tuple[str, Any]:
    return _AnswerUnpickler(io.BytesIO(head), buffers=buffers).load()
