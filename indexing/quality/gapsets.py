"""The query sets an index knows, as the gap report's query groups (captions with their
paired images, the query log per modality, user files): the same sets `index build` tunes on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cachebind.analysis.gap import QueryGroup
from cachebind.analysis.sampling import vectors_at
from cachebind.store import CacheTable
from indexing.quality.querysets import caption_set, file_set, log_sets


def known_query_groups(
    table: CacheTable,
    index_dir: Path | str,
    files: Sequence[tuple[str, Path]] = (),
    size: int = 2_000,
    seed: int = 0,
) -> list[QueryGroup]:
    """Captions (paired with their rows' vectors), each modality's query log in
    ``index_dir``, and each ``(modality, path)`` file; ``size`` queries a set at most."""
    groups = []
    captions = caption_set(table.dataset, size, seed)
    if captions is not None:
        groups.append(
            QueryGroup(
                captions.name,
                captions.modality,
                captions.queries,
                captions.self_positions,
                vectors_at(table, captions.self_positions),
            )
        )
    for qs in log_sets(Path(index_dir), table.dim, size, seed):
        groups.append(QueryGroup(qs.name, qs.modality, qs.queries))
    for modality, path in files:
        qs = file_set(modality, Path(path), table.dim, size, seed)
        groups.append(QueryGroup(qs.name, qs.modality, qs.queries))
    return groups
