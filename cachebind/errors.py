"""Errors that carry what a user needs to fix their input."""

from __future__ import annotations


class CachebindError(Exception):
    """Base class of every error cachebind raises on purpose."""


class InputError(CachebindError, ValueError):
    """An input cannot be used: names the input and the reason.

    ``reason`` is a short machine-readable tag (``undecodable``, ``truncated``, ``empty``,
    ``too_large``, ``decompression_bomb``, ``unsupported_format``, ``wrong_type`` …) that the
    embedding job counts in its error report; ``detail`` is the human explanation.
    """

    def __init__(self, source: str, reason: str, detail: str = "") -> None:
        self.source = source
        self.reason = reason
        self.detail = detail
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))


class WeightsError(CachebindError):
    """A checkpoint is missing, corrupt, or does not match the architecture."""


class IndexMismatchError(CachebindError):
    """A published index was built from a different table than the one it is used with."""


class GenerationBusy(CachebindError):
    """The generation queue is full (``llm.max_queue``); retry after ``retry_after_s``."""

    def __init__(self, depth: int, retry_after_s: int) -> None:
        super().__init__(f"{depth} generations are waiting; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s
