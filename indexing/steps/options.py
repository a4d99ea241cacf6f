"""How a build, an add or a re-tune runs: one frozen set of options for the three doors.

What to build (budgets, recall target, where versions go) is
:class:`cachebind.config.IndexConfig`; these are the choices of one run that no configuration
file holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cachebind.arrays import Floats
from indexing.steps.prepare import QueryFiles
from indexing.steps.staging import StageHook

Shards = int | Literal["auto"]
"""Ray tasks adding rows: 1 (or less) builds in this process, ``"auto"`` one task per cluster
CPU for a table of :data:`indexing.steps.build.SHARDED_FROM_ROWS` rows or more (one process
below)."""


@dataclass(frozen=True)
class BuildOptions:
    """Options of :func:`indexing.build`, :func:`indexing.add` and :func:`indexing.tune`.

    Every door reads ``progress`` and ``query_files`` (more query sets, ``[(modality, path)]``,
    as ``--queries text=q.npy``). ``build`` and a rebuild by ``add`` (when the grown table has
    outgrown the index) read ``shards``, ``ray_address`` and ``on_stage`` (called as the build
    passes each stage: progress reporting; tests crash a build mid-way with it); ``add`` calls
    ``on_stage`` too. Only ``build`` reads ``index_key`` (a FAISS factory key forced instead of
    the selection: still tuned, and escalated only with ``escalate_forced``) and ``queries``
    (held-out queries to tune on instead of sampled table rows).
    """

    progress: bool = True
    shards: Shards = 1
    ray_address: str | None = None
    index_key: str | None = None
    escalate_forced: bool = False
    query_files: QueryFiles = field(default=())
    queries: Floats | None = field(default=None, compare=False)
    on_stage: StageHook | None = None

    def __post_init__(self) -> None:
        # A caller's list would leave the frozen options mutable through it.
        object.__setattr__(self, "query_files", tuple(self.query_files))
