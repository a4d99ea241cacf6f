"""F_M -> F~_M through a snapshot's cache model, micro-batched across concurrent requests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cachebind.arrays import Floats
from cachebind.cache import Enhanced
from cachebind.config import ServeConfig
from cachebind.serve.batching import ItemError, MicroBatcher
from cachebind.serve.metrics import Metrics
from cachebind.serve.runtime import IndexSnapshot
from cachebind.serve.services.batchers import service_batcher
from cachebind.serve.services.parts import Parts, part_key


@dataclass(frozen=True)
class EnhanceQuery:
    """One query of an enhance batch: F~_M of ``f_m`` with ``k``, ``t`` and ``alpha``."""

    snapshot: IndexSnapshot
    """The index version the request took: its neighbours and F_value come from it."""
    f_m: Floats
    """The query's feature F_M [d]."""
    k: int
    t: float
    alpha: float
    parts: Parts
    """The query's modalities: each is searched with its own tuned setting."""


def enhance_batch(queries: list[EnhanceQuery]) -> list[Enhanced | ItemError]:
    """F~_M of every query, one cache call per (snapshot, k, t, alpha, modalities) group."""
    answers: dict[int, Enhanced] = {}
    groups: dict[tuple[int, int, float, float, Parts], list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault((id(q.snapshot), q.k, q.t, q.alpha, part_key(q.parts)), []).append(i)
    for (_, k, t, alpha, parts), members in groups.items():
        snapshot = queries[members[0]].snapshot
        f_m = np.stack([queries[i].f_m for i in members]).astype(np.float32)
        enhanced = snapshot.cache.enhance(f_m, k, t, alpha, list(parts))
        for i, one in zip(members, enhanced, strict=True):
            answers[i] = one
    return [answers[i] for i in range(len(queries))]


class EnhanceService:
    """Owns the enhance micro-batcher; ``enhance`` is one request's share of a batch."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.batcher: MicroBatcher[EnhanceQuery, Enhanced] = service_batcher(
            enhance_batch, config, metrics, "enhance", max_inflight=2
        )

    async def enhance(self, query: EnhanceQuery) -> Enhanced:
        return await self.batcher.submit(query)

    async def close(self) -> None:
        await self.batcher.close()
