"""Errors of the store: a table that a job must not append to."""

from __future__ import annotations

from cachebind.errors import CachebindError


class TableMismatchError(CachebindError):
    """An existing table has another layout (vector size/type, columns) than a job writes."""


class EncoderMismatchError(TableMismatchError):
    """An existing table holds vectors of another encoder (preset, checkpoint or preprocessing):
    mixing them would make its inner products meaningless."""
