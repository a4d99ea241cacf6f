"""Tune a trained index on every query set, and move to a stronger key when it cannot reach the
target: the worst deciding set decides (:mod:`indexing.quality.tune`), and the stronger keys come
from :func:`indexing.steps.select.stronger_keys`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from indexing.mechanics.fit import search_fn
from indexing.mechanics.params import apply_search_params, search_grid
from indexing.quality.tune import Groups, TuneResult, tune
from indexing.steps.prepare import fit_on_sample
from indexing.steps.rows import Work, add_range
from indexing.steps.select import Selection, stronger_keys, train_size_for

log = logging.getLogger(__name__)


@dataclass
class Tuned:
    """An index with its tuning result (None: nothing to tune on)."""

    index: faiss.Index
    selection: dict[str, Any]
    result: TuneResult | None

    def reached(self, target: float) -> bool:
        """The chosen setting meets the target on every deciding set, within any latency
        budget (with a budget, the tuner may have had to give recall up to fit it)."""
        if self.result is None:
            return True
        chosen = [t for t in self.result.trials if t.params == self.result.params]
        met = any(t.meets(target) for t in chosen)
        return met and self.result.latency_met is not False


def tune_index(
    work: Work,
    index: faiss.Index,
    selection: dict[str, Any],
    truth: np.ndarray,
    groups: Groups,
    progress: bool,
) -> Tuned:
    """Tune ``index``'s search parameters on every query set (the worst deciding set decides)."""
    cfg = work.config
    k = min(cfg.recall_k, work.n - 1)
    if not len(work.queries) or k < 1:
        return Tuned(index, selection, None)
    result = tune(
        search_fn(index),
        lambda p: apply_search_params(index, p),
        search_grid(index, gpu=selection.get("device") == "gpu"),
        work.queries,
        work.query_positions,
        truth,
        k=k,
        target=cfg.recall_target,
        latency_budget_ms=cfg.latency_budget_ms,
        progress=progress,
        groups=groups,
    )
    return Tuned(index, selection, result)


def worst_set_name(tuned: Tuned) -> str:
    result = tuned.result
    if result is None or not result.trials:
        return "?"
    best = next((t for t in result.trials if t.params == result.params), result.trials[-1])
    return min(best.by_set, key=lambda name: best.by_set[name]) if best.by_set else "?"


def escalate(
    work: Work, first: Tuned, truth: np.ndarray, groups: Groups, progress: bool
) -> tuple[Tuned, str | None]:
    """``first`` if it reaches the target, else the first stronger key that does (or, if none
    does, whichever got closest), and why the key changed (None: it did not)."""
    cfg = work.config
    if first.reached(cfg.recall_target) or not cfg.escalate:
        return first, None
    key = first.selection["key"]
    shortfall = (
        f"{key} reaches recall@{cfg.recall_k} {first.result.recall:.3f} on {worst_set_name(first)}"
        if first.result
        else key
    )
    if first.result is not None and first.result.latency_met is False:
        shortfall += f" not within {cfg.latency_budget_ms} ms"
    best, tried = first, []
    for candidate, why in stronger_keys(key, work.n, work.dim, cfg.memory_budget_gb):
        budget = cfg.memory_budget_gb * 2**30
        selection = Selection(
            candidate,
            f"escalated from {key}: {why}",
            train_size_for(candidate, work.n, work.dim, budget),
            tuple(first.selection.get("autofaiss_keys", ())),
        )
        log.info("escalating %s -> %s: %s", key, candidate, shortfall)
        t0 = time.perf_counter()
        index = fit_on_sample(work, selection, progress)
        add_range(
            index, work.table.dataset, 0, work.n, None, progress=progress, column=work.table.column
        )
        work.timings["escalate_s"] = work.timings.get("escalate_s", 0.0) + time.perf_counter() - t0
        tuned = tune_index(work, index, selection.to_dict(), truth, groups, progress)
        tried.append(candidate)
        if tuned.reached(cfg.recall_target):
            reason = (
                f"{shortfall} (target {cfg.recall_target} with the confidence margin, on every "
                f"trusted query set); escalated to {candidate}: {why}"
            )
            return tuned, reason
        if tuned.result and best.result and tuned.result.recall > best.result.recall:
            best = tuned
    reason = (
        f"{shortfall}; no key within the {cfg.memory_budget_gb} GiB budget reached the target"
        + (
            f" (tried {', '.join(tried)}; kept {best.selection['key']}, the closest)"
            if tried
            else ""
        )
    )
    return best, reason
