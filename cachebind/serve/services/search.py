"""Nearest-row search over a snapshot's index, micro-batched across concurrent requests, and a
page of filtered, deduplicated results on top of it (``serve.search``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from cachebind.arrays import Floats, Ints
from cachebind.config import ServeConfig
from cachebind.serve.batching import ItemError, MicroBatcher
from cachebind.serve.metrics import Metrics
from cachebind.serve.runtime import IndexSnapshot
from cachebind.serve.search import SearchPage, search
from cachebind.serve.services.batchers import service_batcher
from cachebind.serve.services.parts import Parts, part_key

Ranked = tuple[Floats, Ints]
"""Scores [k] and row ids [k] of one query, best first (ids of -1 where the index had fewer)."""


@dataclass(frozen=True)
class SearchQuery:
    """One query of a search batch: the ``k`` nearest rows to ``f_m`` on ``snapshot``."""

    snapshot: IndexSnapshot
    """The index version the request took: a batch may straddle a swap."""
    f_m: Floats
    """The query's feature [d]."""
    k: int
    parts: Parts
    """The query's modalities: each is searched with its own tuned setting."""


def search_batch(queries: list[SearchQuery]) -> list[Ranked | ItemError]:
    """The ranked rows of every query, one index call per (snapshot, modalities) group."""
    groups: dict[tuple[int, Parts], list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault((id(q.snapshot), part_key(q.parts)), []).append(i)
    answers: dict[int, Ranked] = {}
    for (_, parts), members in groups.items():
        snapshot = queries[members[0]].snapshot
        k = max(queries[i].k for i in members)
        stacked = np.stack([queries[i].f_m for i in members]).astype(np.float32)
        scores, ids = snapshot.index.search(stacked, k, list(parts))
        for row, i in enumerate(members):
            kk = queries[i].k
            answers[i] = (np.asarray(scores[row, :kk]), np.asarray(ids[row, :kk]))
    return [answers[i] for i in range(len(queries))]


class SearchService:
    """Owns the index micro-batcher; ``nearest`` is one request's share of a batch."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.batcher: MicroBatcher[SearchQuery, Ranked] = service_batcher(
            search_batch, config, metrics, "index", max_inflight=2
        )

    async def nearest(self, query: SearchQuery) -> Ranked:
        return await self.batcher.submit(query)

    async def page(
        self,
        snapshot: IndexSnapshot,
        f_m: Floats,
        parts: Parts,
        *,
        need: int,
        where: pc.Expression | None,
        dedup: float | None,
        max_widenings: int,
        max_candidates: int,
    ) -> SearchPage:
        """The first ``need`` rows nearest to ``f_m`` that pass ``where`` and ``dedup``
        (``serve.search.search``: over-fetching through this batcher, table reads off the
        event loop)."""

        async def ranked(query: Floats, n: int) -> Ranked:
            return await self.nearest(SearchQuery(snapshot, query, n, parts))

        return await search(
            snapshot,
            f_m,
            need=need,
            search_fn=ranked,
            run=asyncio.to_thread,
            where=where,
            dedup=dedup,
            max_widenings=max_widenings,
            max_candidates=max_candidates,
        )

    async def close(self) -> None:
        await self.batcher.close()
