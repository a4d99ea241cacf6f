"""Cross-modal search over a snapshot: over-fetch, filter rows, drop near-duplicates, paginate.

The index knows nothing of metadata, so a filtered query asks the index for more candidates than
it needs, keeps the rows that pass the filter (a pyarrow expression over the rows fetched by id
from the table) and, when too few pass, widens the fetch geometrically until it has ``offset + k``
results, the whole table has been ranked, or its bounded number of widenings is spent (then the
page is marked partial).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cachebind.serve.filters import filter_columns
from cachebind.serve.runtime import IndexSnapshot

META_COLUMNS = ["id", "key", "caption", "url", "width", "height"]
SearchFn = Callable[[np.ndarray, int], Awaitable[tuple[np.ndarray, np.ndarray]]]
RunFn = Callable[..., Awaitable[Any]]

# First over-fetch factor when a filter or dedup may discard candidates, and the growth factor.
OVERFETCH = 4
GROWTH = 4


@dataclass
class Hit:
    id: int
    score: float
    row: dict[str, Any]


@dataclass
class SearchPage:
    hits: list[Hit]
    exhausted: bool
    partial: bool = False  # stopped widening before finding ``need`` hits


async def search(
    snapshot: IndexSnapshot,
    query: np.ndarray,
    *,
    need: int,
    search_fn: SearchFn,
    run: RunFn,
    where: pc.Expression | None = None,
    dedup: float | None = None,
    max_widenings: int = 3,
    max_candidates: int = 20_000,
) -> SearchPage:
    """The first ``need`` results for ``query`` ([d]) that pass ``where`` and ``dedup``.

    ``search_fn(query, n)`` ranks n candidates (through the index micro-batcher); ``run(fn,
    *args)`` runs blocking table reads off the event loop. A filtered or deduplicated search
    widens its candidate set at most ``max_widenings`` times and never past ``max_candidates``
    (or ``need``, if larger): a filter that matches nothing costs a few index calls, not a
    ranking of the whole table. It then answers what it has, with ``partial`` set.
    """
    total = snapshot.rows
    cap = min(total, max(max_candidates, need))
    fetch = min(max(need * (OVERFETCH if (where is not None or dedup) else 1), need), cap)
    fetch = max(fetch, 1)
    widenings = 0
    while True:
        scores, ids = await search_fn(query, fetch)
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        exhausted = fetch >= total or len(ids) < fetch
        hits = await run(_select, snapshot, scores, ids, where, dedup, need)
        if len(hits) >= need or exhausted:
            return SearchPage(hits=hits[:need], exhausted=exhausted and len(hits) <= need)
        if widenings >= max_widenings or fetch >= cap:
            return SearchPage(hits=hits, exhausted=False, partial=True)
        widenings += 1
        fetch = min(fetch * GROWTH, cap)


def _select(
    snapshot: IndexSnapshot,
    scores: np.ndarray,
    ids: np.ndarray,
    where: pc.Expression | None,
    dedup: float | None,
    need: int,
) -> list[Hit]:
    """Rank-ordered hits among the candidates that pass the filter and the dedup threshold."""
    if len(ids) == 0:
        return []
    columns = sorted(set(META_COLUMNS) | (set(filter_columns()) if where is not None else set()))
    rows: pa.Table = snapshot.table.rows(ids, columns)
    # rows() keeps the order asked and leaves out ids missing from the table; re-align scores.
    score_of = {int(i): float(s) for i, s in zip(ids.tolist(), scores.tolist(), strict=True)}
    if where is not None:
        rows = rows.filter(where)
    kept_ids = rows.column("id").to_pylist()
    if dedup is not None and kept_ids:
        keep = _dedup(snapshot.table.vectors(kept_ids), dedup, need)
        rows = rows.take(pa.array(keep, pa.int64()))
    return [Hit(id=int(r["id"]), score=score_of[int(r["id"])], row=r) for r in rows.to_pylist()]


def _dedup(vectors: np.ndarray, threshold: float, need: int) -> list[int]:
    """Greedy near-duplicate removal in rank order, on the exact cached vectors.

    A candidate is dropped when its cosine to any already kept one exceeds ``threshold``.
    """
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    kept: list[int] = []
    for i in range(len(v)):
        if kept and float(np.max(v[kept] @ v[i])) > threshold:
            continue
        kept.append(i)
        if len(kept) >= need:
            break
    return kept
