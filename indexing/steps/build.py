"""Build a version: select -> fit -> add -> tune -> measure -> write (staged), then publish.

Every path (a single build, a sharded Ray build, an incremental add, :mod:`indexing.steps.add`)
runs the same steps:

* query sets (:mod:`indexing.steps.prepare`, :mod:`indexing.quality.querysets`): ``N_QUERIES``
  table rows sampled with a fixed seed and kept out of the fitting sample, the table's caption
  embeddings, the service's query log and the caller's query files; their exact top-100
  (leave-one-out for queries that are, or are paired with, a row:
  :mod:`indexing.quality.recall`) is computed while the rows stream into the index, so the
  table is read once;
* fitting on a sample (:func:`indexing.steps.prepare.fit_on_sample`,
  :mod:`indexing.mechanics.fit`), adding every row (:mod:`indexing.steps.rows`, or
  :mod:`indexing.steps.shards` on Ray);
* tuning toward recall@k >= target on every trusted set (:mod:`indexing.steps.escalate`,
  :mod:`indexing.quality.tune`: the worst set decides), escalating to a stronger key when the
  chosen one cannot get there (:func:`indexing.steps.select.stronger_keys`), then recall@1/10/100
  and latency per set measured with the chosen parameters (:mod:`indexing.quality.measure`);
* the files and the manifest are written (:mod:`indexing.steps.staging`) into a staging
  directory that only :func:`indexing.versions.publishing.publish` moves into ``versions/``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cachebind.arrays import Floats, Ints
from cachebind.config import IndexConfig
from cachebind.published.gpu import to_gpu
from cachebind.published.manifest import read_manifest
from cachebind.store import CacheTable
from indexing.mechanics.fit import search_fn
from indexing.mechanics.ondisk import IVFDATA_FILE, plan_merge
from indexing.quality.bymodality import tune_and_measure
from indexing.quality.measure import groups_of
from indexing.quality.querysets import deciding
from indexing.quality.recall import drop_self
from indexing.quality.tune import measure_latency
from indexing.steps.escalate import escalate, tune_index
from indexing.steps.options import BuildOptions
from indexing.steps.prepare import fit_on_sample, prepare_work
from indexing.steps.rows import Work, add_range, read_positions
from indexing.steps.select import select_for
from indexing.steps.staging import StageHook, write_staged
from indexing.versions.publishing import new_staging_dir, publish
from indexing.versions.retention import pinned

log = logging.getLogger(__name__)


def finish(
    work: Work,
    index: faiss.Index,
    ids: Ints,
    selection: dict[str, Any],
    *,
    progress: bool,
    on_stage: StageHook | None,
    extra: dict[str, Any],
    staged: Path | None = None,
    may_escalate: bool = True,
) -> Path:
    """Tune, measure, and write the staged version; returns the staging directory.

    ``staged``: the staging directory when the build already wrote into it (an on-disk index's
    ivfdata); like one created here, it is removed if anything fails.
    """
    try:
        return _tune_and_write(
            work, index, ids, selection, progress, on_stage, extra, staged, may_escalate
        )
    except BaseException:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        raise


def _tune_and_write(
    work: Work,
    index: faiss.Index,
    ids: Ints,
    selection: dict[str, Any],
    progress: bool,
    on_stage: StageHook | None,
    extra: dict[str, Any],
    staged: Path | None,
    may_escalate: bool,
) -> Path:
    cfg = work.config
    if index.ntotal != work.n or len(ids) != work.n:
        raise RuntimeError(f"index holds {index.ntotal} rows, the table {work.n}")
    truth = drop_self(work.exact.positions, work.query_positions, work.exact.k - 1)
    groups = groups_of(work.sets, deciding(work.sets))
    t0 = time.perf_counter()
    tuned = tune_index(work, index, selection, truth, groups, progress)
    work.timings["tune_s"] = time.perf_counter() - t0
    reason = None
    if may_escalate:
        tuned, reason = escalate(work, tuned, truth, groups, progress)
    if tuned.index is not index and staged is not None:
        (staged / IVFDATA_FILE).unlink(missing_ok=True)  # the escalated key is in memory
    index, selection = tuned.index, tuned.selection
    if on_stage:
        on_stage("tuned")
    result = tuned.result
    t0 = time.perf_counter()
    # Latency is measured with what serving will use: the GPU searcher when there is one.
    gpu_searcher = to_gpu(index, selection["key"]) if selection.get("device") == "gpu" else None
    by_modality, sets = tune_and_measure(
        work, index, result, groups, truth, gpu_searcher=gpu_searcher, progress=progress
    )
    timed = gpu_searcher.search if gpu_searcher is not None else search_fn(index)
    probes = work.queries if len(work.queries) else _probe(work)
    latency = measure_latency(timed, probes, cfg.recall_k, progress=progress)
    work.timings["measure_s"] = time.perf_counter() - t0
    return write_staged(
        work.table,
        index,
        ids,
        staged,
        cfg,
        selection=selection,
        result=result,
        sets=sets,
        latency=latency,
        timings=work.timings,
        extra=extra,
        selection_reason=reason,
        by_modality=by_modality,
        on_stage=on_stage,
    )


def _probe(work: Work) -> Floats:
    """Latency probes for a table too small for held-out queries (one row)."""
    return read_positions(work.table.dataset, np.arange(min(work.n, 64)), work.table.column)


def build_index(
    table: CacheTable,
    config: IndexConfig,
    options: BuildOptions | None = None,
    *,
    lineage: dict[str, Any] | None = None,
) -> Path:
    """Build, tune and verify a new index of ``table``; returns its complete staging directory.

    Nothing is published (see :func:`publish`). ``options``: :class:`BuildOptions` (sharded on
    Ray, a forced key, the caller's query sets, stage hooks). ``lineage``: manifest fields
    saying where this build came from (a rebuild by :func:`indexing.add`).
    """
    options = options or BuildOptions()
    progress, on_stage, index_key = options.progress, options.on_stage, options.index_key
    t0 = time.perf_counter()
    work = prepare_work(table, config, options.queries, options.query_files)
    work.timings["prepare_s"] = time.perf_counter() - t0
    shards = (
        default_shards(work.n, options.ray_address) if options.shards == "auto" else options.shards
    )
    selection = select_for(work.n, work.dim, config, forced=index_key)
    log.info("index for %d x %d: %s (%s)", work.n, work.dim, selection.key, selection.reason)
    # Decided before training, so a key that cannot be merged as asked fails fast.
    merge = plan_merge(selection.key, work.n, work.dim, config, max(shards, 1))
    log.info("shards merge %s: %s", "on disk" if merge.on_disk else "in memory", merge.reason)
    index = fit_on_sample(work, selection, progress)
    if on_stage:
        on_stage("trained")

    # An on-disk merge writes the version's ivfdata straight into its staging directory.
    staged = new_staging_dir(config.dir) if merge.on_disk else None
    try:
        t0 = time.perf_counter()
        if shards > 1:
            from indexing.steps.shards import add_sharded

            index, ids = add_sharded(
                index,
                table,
                work,
                shards,
                ray_address=options.ray_address,
                progress=progress,
                ivfdata=staged / IVFDATA_FILE if staged is not None else None,
                shard_dir=config.shard_dir,
                on_stage=on_stage,
            )
        else:
            ids = add_range(
                index, table.dataset, 0, work.n, work.exact, progress=progress, column=table.column
            )
        work.timings["add_s"] = time.perf_counter() - t0
        if on_stage:
            on_stage("added")
    except BaseException:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    return finish(
        work,
        index,
        ids,
        selection.to_dict(),
        progress=progress,
        on_stage=on_stage,
        extra={
            "parent_version": None,
            "shards": max(shards, 1),
            "storage": {"reason": merge.reason},
        }
        | (lineage or {}),
        staged=staged,
        may_escalate=index_key is None or options.escalate_forced,
    )


SHARDED_FROM_ROWS = 1_000_000
"""Tables from this size are built in parallel Ray tasks when the shards are ``"auto"``."""


def default_shards(rows: int, ray_address: str | None) -> int:
    """One task per cluster CPU for large tables; small ones are faster in one process."""
    if rows < SHARDED_FROM_ROWS:
        return 1
    import ray

    from cachebind.raycluster import start_or_join_ray

    start_or_join_ray(ray_address, log_to_driver=False)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def build(
    table: CacheTable, config: IndexConfig, options: BuildOptions | None = None
) -> dict[str, Any]:
    """Build a new version of ``table``'s index and make it CURRENT (``cachebind index build``).

    Selects the key for the table under ``config``'s budgets, fits it, adds every row, tunes it
    to the recall target on every query set (escalating to a stronger key when needed), writes
    the version and publishes it atomically. Returns the published manifest (JSON).
    """
    if table.column != config.column:
        raise ValueError(
            f"index.column is {config.column!r} but the table handle reads {table.column!r}: "
            "open the table with column=config.column"
        )
    # The table version being read is tagged while this runs: a gc meanwhile keeps it.
    with pinned(table):
        staged = build_index(table, config, options)
        version = publish(config.dir, staged, config.keep_versions)
    return read_manifest(config.dir, version).to_json()
