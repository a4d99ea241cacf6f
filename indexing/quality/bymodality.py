"""Search parameters per query modality: each modality pays only for the recall it needs.

The worst query set decides the version's ``search_params`` (:mod:`indexing.quality.tune`), and a
text or audio query far from every centroid needs several times the lists probed and the
candidates re-ranked that an image query needs. Searching image queries with the cross-modal
setting would spend that cost for nothing, so after the global tuning each modality with
trusted query sets is tuned again on its own sets, over settings no larger than the global one
in either knob (``nprobe`` / ``efSearch`` and ``k_factor``); the manifest records the result as
``search_params_by_modality``. A query whose modality has no trusted set (or a raw embedding)
keeps the global setting, and a mix of modalities takes each knob's largest value among its
parts (:func:`indexing.mechanics.params.strongest`), so every part reaches what it was tuned to.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from cachebind.arrays import Floats, Ints
from cachebind.config import IndexConfig
from indexing.mechanics.fit import search_fn
from indexing.mechanics.params import apply_search_params, search_grid
from indexing.quality.measure import measure_sets
from indexing.quality.querysets import QuerySet
from indexing.quality.tune import Groups, SearchFn, TuneResult, tune


class Measured(Protocol):
    """What tuning and measuring read of a build's work (the build steps' ``Work``)."""

    @property
    def config(self) -> IndexConfig: ...
    @property
    def n(self) -> int: ...
    @property
    def sets(self) -> list[QuerySet]: ...
    @property
    def queries(self) -> Floats: ...
    @property
    def query_positions(self) -> Ints: ...


def modality_members(sets: list[QuerySet], groups: Groups) -> dict[str, list[int]]:
    """Modality -> the trusted deciding sets of that modality (their indices in ``sets``)."""
    out: dict[str, list[int]] = {}
    for i in groups.deciding:
        if sets[i].trusted and len(sets[i]):
            out.setdefault(sets[i].modality, []).append(i)
    return out


def _within(
    grid: tuple[str | None, list[int], list[int]], ceiling: dict[str, int]
) -> tuple[str | None, list[int], list[int]]:
    knob, values, kfs = grid
    if knob is not None and knob in ceiling:
        values = [v for v in values if v <= ceiling[knob]]
    if "k_factor" in ceiling:
        kfs = [kf for kf in kfs if kf <= ceiling["k_factor"]]
    return knob, values, kfs


def tune_by_modality(
    search: SearchFn,
    index: Any,
    result: TuneResult,
    sets: list[QuerySet],
    groups: Groups,
    queries: Floats,
    self_positions: Ints,
    truth: Ints,
    *,
    k: int,
    target: float,
    gpu: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, int]]:
    """Modality -> the cheapest setting, no larger than ``result.params``, reaching ``target``
    (with the confidence margin) on every trusted set of that modality; only modalities for
    which that is cheaper than the global setting. The index is left at ``result.params``."""
    knob, values, kfs = _within(search_grid(index, gpu=gpu), result.params)
    out: dict[str, dict[str, int]] = {}
    if knob is None and not kfs:
        return out
    try:
        for modality, members in modality_members(sets, groups).items():
            parts = [groups.slices[i] for i in members]
            sub = np.concatenate([np.arange(len(queries))[p] for p in parts])
            starts = np.cumsum([0] + [p.stop - p.start for p in parts])
            own = Groups(
                [groups.names[i] for i in members],
                [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)],
                list(range(len(members))),
            )
            found = tune(
                search,
                lambda p: apply_search_params(index, p),
                (knob, values, kfs),
                queries[sub],
                self_positions[sub],
                truth[sub],
                k=k,
                target=target,
                progress=progress,
                groups=own,
            )
            met = any(t.meets(target) for t in found.trials if t.params == found.params)
            if met and found.params != result.params:
                out[modality] = found.params
    finally:
        apply_search_params(index, result.params)
    return out


def tune_and_measure(
    work: Measured,
    index: Any,
    result: TuneResult | None,
    groups: Groups,
    truth: Ints,
    *,
    gpu_searcher: Any | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict[str, int]], list[dict[str, Any]]]:
    """(``search_params_by_modality``, ``query_sets``) of a tuned index: each set's recall and
    latency are measured with the setting its modality's queries will be served with.

    A GPU copy (``gpu_searcher``, whose latency is what serving sees) is searched with the
    global setting only, so no per-modality setting is tuned for it.
    """
    cfg = work.config
    search = search_fn(index)
    by_modality: dict[str, dict[str, int]] = {}
    if result is not None:
        apply_search_params(index, result.params)
        if gpu_searcher is None:
            by_modality = tune_by_modality(
                search,
                index,
                result,
                work.sets,
                groups,
                work.queries,
                work.query_positions,
                truth,
                k=min(cfg.recall_k, work.n - 1),
                target=cfg.recall_target,
                progress=progress,
            )
    default = result.params if result is not None else {}

    def use(modality: str | None) -> None:
        params = by_modality.get(modality or "", default)
        for searcher in (index, gpu_searcher):
            if searcher is not None:
                apply_search_params(searcher, params)

    timed = gpu_searcher.search if gpu_searcher is not None else search
    try:
        sets = measure_sets(
            search,
            timed,
            work.sets,
            groups,
            work.query_positions,
            truth,
            n_rows=work.n,
            recall_k=cfg.recall_k,
            use_modality=use,
        )
    finally:
        use(None)
    for report in sets:
        report["search_params"] = by_modality.get(report["modality"], default)
    return by_modality, sets
