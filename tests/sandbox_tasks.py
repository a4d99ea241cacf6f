"""Tasks for tests/test_sandbox.py: module-level functions, as the sandbox requires (each runs
in a worker process, which imports this module by name)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from cachebind.errors import InputError


def echo(value: object) -> object:
    return value


def pid() -> int:
    return os.getpid()


def parent_pid() -> int:
    return os.getppid()


def abort() -> None:
    os.abort()  # a native crash: SIGABRT, as a C decoder's failed assertion would


def allocate(mib: int) -> int:
    block = np.ones(mib * 1024 * 1024, dtype=np.uint8)
    return int(block.sum())


def sleep_then_write(seconds: float, path: str) -> str:
    time.sleep(seconds)
    Path(path).write_text("still ran")
    return path


def spin(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def slow_echo(value: object, seconds: float) -> object:
    time.sleep(seconds)
    return value


def image_array(n: int) -> np.ndarray:
    return np.arange(n * 3 * 224 * 224, dtype=np.float32).reshape(n, 3, 224, 224)


def tensor_dict() -> dict:
    import torch

    return {"pixels": torch.arange(12, dtype=torch.float32).reshape(3, 4), "w": 4}


def refuse(source: str) -> None:
    raise InputError(source, "unsupported_format", "not an image at all")


def bug() -> None:
    raise KeyError("a decoder bug")


def a_date() -> object:
    import datetime

    return datetime.date(2024, 1, 1)  # pickles as a call of datetime.date: not plain data
