"""Tune search parameters toward a recall target, and measure latency.

autofaiss tunes to *use up* a latency budget (docs/DEPENDENCIES.md); here the goal is the cheapest
setting whose measured recall@k on held-out queries reaches the target. A latency budget, when
given, is a constraint on that choice, never something to fill.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from indexing.quality.recall import drop_self, per_query_recall

CONFIDENCE_Z = 1.28
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""(queries [n, d], k) -> (scores [n, k], positions [n, k])."""
log = logging.getLogger(__name__)


@dataclass
class Trial:
    params: dict[str, int]
    recall: float
    ms_per_query: float
    """Wall time of searching all tuning queries in one batch, per query."""
    stderr: float = 0.0
    """Standard error of ``recall`` over the queries."""
    by_set: dict[str, float] = field(default_factory=dict)
    """recall@k of each query set; ``recall``/``stderr`` are those of the deciding set whose
    lower confidence bound is lowest (the worst set decides)."""

    def meets(self, target: float) -> bool:
        """Recall reaches ``target`` with ~90% confidence (one-sided), not just on average:
        1000 queries leave +-0.3% of sampling error that new queries would otherwise expose."""
        return self.recall - CONFIDENCE_Z * self.stderr >= target


@dataclass
class TuneResult:
    params: dict[str, int]
    recall: float
    target_met: bool
    latency_met: bool | None = None
    trials: list[Trial] = field(default_factory=list)


@dataclass(frozen=True)
class Groups:
    """Which of the stacked queries belong to which query set, and which sets decide."""

    names: list[str]
    slices: list[slice]
    deciding: list[int]


def set_stats(per_query: np.ndarray, groups: Groups) -> list[tuple[float, float]]:
    """(mean, standard error) of the per-query recall of each set."""
    out = []
    for part in groups.slices:
        x = per_query[part]
        if len(x) == 0:
            out.append((float("nan"), 0.0))
            continue
        se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
        out.append((float(x.mean()), se))
    return out


def worst_set(stats: list[tuple[float, float]], groups: Groups) -> int:
    """The deciding set with the lowest lower confidence bound (recall - z * stderr)."""
    return min(groups.deciding, key=lambda i: stats[i][0] - CONFIDENCE_Z * stats[i][1])


def per_query_leave_one_out(
    search: SearchFn,
    queries: np.ndarray,
    self_positions: np.ndarray,
    truth: np.ndarray,
    k: int,
) -> tuple[np.ndarray, float]:
    """(recall@k of each query, ms per query) of ``search`` against exact ``truth``."""
    t0 = time.perf_counter()
    _, found = search(queries, k + 1)
    ms = (time.perf_counter() - t0) * 1e3 / max(len(queries), 1)
    return per_query_recall(drop_self(found, self_positions, k), truth, k), ms


def leave_one_out_recall(
    search: SearchFn,
    queries: np.ndarray,
    self_positions: np.ndarray,
    truth: np.ndarray,
    k: int,
) -> tuple[float, float, float]:
    """(recall@k, ms per query, standard error of recall) of ``search`` against exact
    ``truth`` (whose own-row entries are already dropped)."""
    t0 = time.perf_counter()
    _, found = search(queries, k + 1)
    ms = (time.perf_counter() - t0) * 1e3 / max(len(queries), 1)
    per_query = per_query_recall(drop_self(found, self_positions, k), truth, k)
    if len(per_query) == 0:
        return float("nan"), ms, 0.0
    stderr = float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return float(per_query.mean()), ms, stderr


def undominated(trials: list[Trial]) -> list[Trial]:
    """The trials no other trial beats on every knob: one that probes at least as many lists
    and re-ranks at least as many candidates as another (and more of one) does strictly more
    work for the same queries, so only timing noise could make it look faster. Dropping it
    before the timed comparison keeps the choice between settings that really trade one knob
    for the other (fewer lists and a larger re-rank, or the reverse)."""

    def dominates(a: Trial, b: Trial) -> bool:
        keys = a.params.keys() | b.params.keys()
        if a.params.keys() != b.params.keys() or a.params == b.params:
            return False
        return all(a.params[key] <= b.params[key] for key in keys)

    return [t for t in trials if not any(dominates(other, t) for other in trials)]


def tune(
    search: SearchFn,
    set_params: Callable[[dict[str, int]], None],
    grid: tuple[str | None, list[int], list[int]],
    queries: np.ndarray,
    self_positions: np.ndarray,
    truth: np.ndarray,
    *,
    k: int,
    target: float,
    latency_budget_ms: float | None = None,
    progress: bool = True,
    groups: Groups | None = None,
) -> TuneResult:
    """The fastest parameters reaching recall@``k`` >= ``target`` on the held-out queries.

    For each re-rank size ``k_factor`` (ascending) a binary search finds the smallest ``nprobe``
    (or ``efSearch``) meeting the target; recall grows with both knobs, so a larger ``k_factor``
    never needs a larger ``nprobe`` and the search range shrinks as it goes. Among the settings
    that meet the target the fastest measured one wins. If none does, the highest recall wins
    and ``target_met`` is False (recorded in the manifest).

    ``groups``: the queries are several query sets stacked; a setting meets the target only
    when every deciding set does, so the worst set decides (:func:`worst_set`).
    """
    knob, values, kfs = grid
    trials: list[Trial] = []
    bar = tqdm(desc="tuning", unit="trial", disable=not progress, leave=False)

    def run(params: dict[str, int]) -> Trial:
        set_params(params)
        if groups is None:
            r, ms, se = leave_one_out_recall(search, queries, self_positions, truth, k)
            trial = Trial(dict(params), r, ms, se)
        else:
            per_query, ms = per_query_leave_one_out(search, queries, self_positions, truth, k)
            stats = set_stats(per_query, groups)
            r, se = stats[worst_set(stats, groups)]
            by_set = {name: round(m, 5) for name, (m, _) in zip(groups.names, stats, strict=True)}
            trial = Trial(dict(params), r, ms, se, by_set)
        trials.append(trial)
        bar.update(1)
        bar.set_postfix(recall=f"{r:.3f}", **{key: v for key, v in params.items()})
        return trial

    if knob is None:
        run({})
    else:
        upper, stalled = len(values) - 1, 0
        k_factors: list[int | None] = [*kfs] if kfs else [None]
        for kf in k_factors:
            lo, hi, found = 0, upper, None
            while lo <= hi:
                mid = (lo + hi) // 2
                params = {knob: values[mid]} | ({"k_factor": kf} if kf is not None else {})
                if run(params).meets(target):
                    found, hi = mid, mid - 1
                else:
                    lo = mid + 1
            if found is not None:
                # A larger re-rank only pays if it lets nprobe shrink; stop when it stops doing so.
                stalled = stalled + 1 if found == upper else 0
                upper = found
                if stalled >= 2:
                    break
    bar.close()

    ok = undominated([t for t in trials if t.meets(target)])
    for t in ok:  # re-time the candidates: one timing of a fast search is mostly noise
        set_params(t.params)
        for _ in range(2):
            t.ms_per_query = min(
                t.ms_per_query,
                leave_one_out_recall(search, queries, self_positions, truth, k)[1],
            )
    latency_met = None
    if ok:
        best = min(ok, key=lambda t: t.ms_per_query)
    else:
        best = max(trials, key=lambda t: (t.recall, -t.ms_per_query))
        log.warning(
            "recall@%d target %.3f not reached: best %.4f, %s", k, target, best.recall, best.params
        )
    if latency_budget_ms is not None:
        # The budget is per single query: check the choice at batch 1, and if it is too slow,
        # take the best recall among settings that fit.
        by_preference = sorted(ok, key=lambda t: t.ms_per_query) + sorted(
            [t for t in trials if not t.meets(target)], key=lambda t: -t.recall
        )
        latency_met = False
        for t in by_preference:
            set_params(t.params)
            if batch1_p50_ms(search, _spread(queries), k) <= latency_budget_ms:
                best, latency_met = t, True
                break
    set_params(best.params)
    return TuneResult(best.params, best.recall, best.recall >= target, latency_met, trials)


def _spread(queries: np.ndarray, n: int = 50) -> np.ndarray:
    """``n`` queries spread over the stacked sets (not just the first set's)."""
    if len(queries) <= n:
        return queries
    return queries[np.linspace(0, len(queries) - 1, n).astype(int)]


def batch1_p50_ms(search: SearchFn, queries: np.ndarray, k: int, n: int = 50) -> float:
    times = []
    for q in queries[:n]:
        t0 = time.perf_counter()
        search(q[None, :], k)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def measure_latency(
    search: SearchFn,
    queries: np.ndarray,
    k: int,
    *,
    max_seconds: float = 2.0,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """p50/p99 latency at batch 1 and batch 64 (and QPS), in milliseconds.

    Up to 1000 single queries and 20+ batches of 64, within ~``max_seconds`` in all.
    """
    out: dict[str, dict[str, float]] = {}
    for batch in (1, 64):
        starts = list(range(0, max(len(queries) - batch + 1, 1), batch))
        reps = starts * max(1, 20 // max(len(starts), 1))  # at least ~20 batches of 64
        times: list[float] = []
        deadline = time.perf_counter() + max_seconds / 2
        search(queries[:batch], k)  # warm-up (page faults, thread pool)
        for s in tqdm(reps, desc=f"latency b{batch}", disable=not progress, leave=False):
            q = queries[s : s + batch]
            t0 = time.perf_counter()
            search(q, k)
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > deadline and len(times) >= 5:
                break
        a = np.asarray(times)
        rows = len(queries[:batch])
        out[f"batch_{batch}"] = {
            "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)),
            "qps": float(rows * len(a) / (a.sum() / 1e3)),
            "batches": len(a),
        }
    return out
