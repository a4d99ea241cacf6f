"""Grouping queries of one batch by the modalities they are searched with."""

from __future__ import annotations

Parts = tuple[str | None, ...]
"""A query's modality labels, one per input (None: a raw embedding or an unlabelled mix)."""


def part_key(parts: Parts) -> Parts:
    """A query's modalities as a grouping key: which parts, not how many or in what order."""
    return tuple(sorted(set(parts), key=lambda p: (p is None, p or "")))
