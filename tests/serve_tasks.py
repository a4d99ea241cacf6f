"""Decoders a test registers in a live server's decode pool (``MediaDecoder.decoders``): they
run in the pool's real worker processes, which import this module by name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from cachebind.modalities import Modality
from cachebind.preprocess import INPUT_SHAPES, preprocess


def abort_on_marker(modality: str, data: bytes, *, limits: Any) -> Any:
    """``os.abort()`` (SIGABRT, as a C decoder's failed assertion) for bytes starting with
    ``ABORT``; the real decoder otherwise."""
    if bytes(data[:5]) == b"ABORT":
        os.abort()
    return preprocess(modality, data, limits=limits)


def sleep_then_write(modality: str, data: bytes, *, limits: Any) -> Any:
    """Sleep 4 s, write to the path ``data`` names, then answer a zero input: a decode whose
    work shows if it goes on after its request was answered."""
    time.sleep(4.0)
    Path(bytes(data).decode()).write_text("still ran")
    return torch.zeros(INPUT_SHAPES[Modality(modality)])
