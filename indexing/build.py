"""Build a version: select -> train -> add -> tune -> measure -> write (staged), then publish.

Every path (a single build, a sharded Ray build, an incremental add, :mod:`indexing.add`) runs
the same steps:

* query sets (:mod:`indexing.querysets`): ``N_QUERIES`` table rows sampled with a fixed seed
  and kept out of the training sample, the table's caption embeddings, the service's query log
  and the caller's query files; their exact top-100 (leave-one-out for queries that are, or are
  paired with, a row: :mod:`indexing.recall`) is computed while the rows stream into the index,
  so the table is read once;
* tuning toward recall@k >= target on every trusted set (:mod:`indexing.tune`: the worst set
  decides), escalating to a stronger key when the chosen one cannot get there
  (:func:`indexing.select.stronger_keys`), then recall@1/10/100 and latency per set measured
  with the chosen parameters (:mod:`indexing.measure`);
* the files and the manifest are written into a staging directory that only
  :func:`indexing.versions.publish` moves into ``versions/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import autofaiss
import faiss
import numpy as np
from tqdm.auto import tqdm

from cachebind.config import IndexConfig, StoreConfig
from cachebind.store import CacheTable
from indexing.faiss_ops import new_index
from indexing.gpu import gpu_memory_bytes, gpu_wanted, to_gpu
from indexing.manifest import build_manifest, table_identity
from indexing.measure import groups_of, measure_sets, worst_trusted
from indexing.ondisk import IVFDATA_FILE, plan_merge, storage_of
from indexing.ondisk import write_index as write_version_index
from indexing.params import apply_search_params, search_grid
from indexing.querysets import (
    FILE,
    HELD_OUT,
    QuerySet,
    caption_set,
    deciding,
    file_set,
    held_out_positions,
    log_sets,
    mark_trust,
    unique_names,
)
from indexing.recall import ExactTopK, drop_self
from indexing.rows import Work, add_range, read_positions
from indexing.select import Selection, select_index, stronger_keys, train_size_for
from indexing.tune import Groups, TuneResult, measure_latency, tune
from indexing.versions import (
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    file_digests,
    new_staging_dir,
    publish,
    read_manifest,
    version_files,
)

log = logging.getLogger(__name__)

N_QUERIES = 1000
"""Held-out queries for tuning and recall: enough for +-1% on recall@10."""
RECALL_KS = (1, 10, 100)
KMEANS_ITERATIONS = 10
SEED = 0

StageHook = Callable[[str], None]
"""Called with a stage name ("trained", "added", "tuned", "index_written"; a sharded on-disk
merge also "shards_written") as a build passes it."""

QueryFiles = list[tuple[str, Path]]
"""``[(modality, path)]``: the caller's query files (``--queries text=q.npy``)."""


def gather_sets(
    table: CacheTable,
    config: IndexConfig,
    queries: np.ndarray | None = None,
    query_files: QueryFiles | None = None,
) -> tuple[list[QuerySet], np.ndarray]:
    """(query sets, held-out positions) for a build of ``table`` (see :mod:`indexing.querysets`).

    ``queries``: the caller's own held-out queries, instead of sampled table rows.
    """
    n, dim = table.count(), table.dim
    size = config.max_queries_per_set
    sets: list[QuerySet] = []
    held = np.zeros(0, np.int64)
    if queries is not None:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        sets.append(
            QuerySet("image:file:caller-supplied", "image", FILE, q, np.full(len(q), -1, np.int64))
        )
    else:
        held = held_out_positions(n, min(N_QUERIES, size), SEED)
        if len(held):
            rows = read_positions(table.dataset, held)
            sets.append(QuerySet("image:held_out", "image", HELD_OUT, rows, held))
    if config.caption_queries:
        captions = caption_set(table.dataset, size, SEED + 2)
        if captions is not None:
            sets.append(captions)
    if config.query_log:
        sets.extend(log_sets(config.dir, dim, size, SEED + 3))
    for modality, path in query_files or []:
        sets.append(file_set(modality, path, dim, size, SEED + 4))
    return unique_names(mark_trust(sets, config.min_queries_per_set)), held


def _prepare(
    table: CacheTable,
    config: IndexConfig,
    queries: np.ndarray | None,
    query_files: QueryFiles | None = None,
) -> Work:
    n, dim = table.count(), table.dim
    if n == 0:
        raise ValueError("the table is empty: nothing to index")
    sets, held = gather_sets(table, config, queries, query_files)
    stacked = (
        np.ascontiguousarray(np.concatenate([s.queries for s in sets]))
        if sets
        else np.zeros((0, dim), np.float32)
    )
    k_truth = min(max(RECALL_KS), n - 1) + 1  # +1: room for the query's own row
    for s in sets:
        log.info("query set %s: %d queries%s", s.name, len(s), "" if s.trusted else " (untrusted)")
    return Work(table, config, n, dim, sets, held, ExactTopK(stacked, k_truth))


def _select(n: int, dim: int, config: IndexConfig) -> Selection:
    gpu_bytes = gpu_memory_bytes() if gpu_wanted(config.use_gpu) else None
    return select_index(n, dim, config.memory_budget_gb, gpu_memory_bytes=gpu_bytes)


def _train(work: Work, selection: Selection, progress: bool) -> faiss.Index:
    index = new_index(work.dim, selection.key)
    if selection.train_size and not index.is_trained:
        rng = np.random.default_rng(SEED + 1)
        pool = np.setdiff1d(np.arange(work.n), work.held_out, assume_unique=True)
        if len(pool) < selection.train_size:
            # A small table is mostly held-out queries: train on every row rather than on too
            # few (k-means needs at least one point per list).
            pool = np.arange(work.n)
        size = min(selection.train_size, len(pool))
        positions = np.sort(rng.choice(pool, size, replace=False))
        t0 = time.perf_counter()
        xt = read_positions(work.table.dataset, positions)
        log.info("training %s on %d vectors", selection.key, len(xt))
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            # 10 k-means iterations instead of 25: the centroids only route the search (the
            # tuner picks nprobe on the result) and k-means is most of a CPU build's time.
            ivf.cp.niter = KMEANS_ITERATIONS
        with tqdm(total=1, desc=f"training {selection.key}", disable=not progress, leave=False):
            index.train(xt)
        work.timings["train_s"] = work.timings.get("train_s", 0.0) + time.perf_counter() - t0
    return index


def _search_fn(index: faiss.Index) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(np.ascontiguousarray(q, dtype=np.float32), k)

    return search


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
        _search_fn(index),
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


def _worst_name(tuned: Tuned) -> str:
    result = tuned.result
    if result is None or not result.trials:
        return "?"
    best = next((t for t in result.trials if t.params == result.params), result.trials[-1])
    return min(best.by_set, key=best.by_set.get) if best.by_set else "?"


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
        f"{key} reaches recall@{cfg.recall_k} {first.result.recall:.3f} on {_worst_name(first)}"
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
        index = _train(work, selection, progress)
        add_range(index, work.table.dataset, 0, work.n, None, progress=progress)
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


def _finish(
    work: Work,
    index: faiss.Index,
    ids: np.ndarray,
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
    ids: np.ndarray,
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
    self_pos = work.query_positions
    truth = drop_self(work.exact.positions, self_pos, work.exact.k - 1)
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
    if result is not None:
        apply_search_params(index, result.params)
    t0 = time.perf_counter()
    search = _search_fn(index)
    on_gpu = selection.get("device") == "gpu"
    # Latency is measured with what serving will use: the GPU searcher when there is one.
    gpu_searcher = to_gpu(index, selection["key"]) if on_gpu else None
    timed = gpu_searcher.search if gpu_searcher is not None else search
    sets = measure_sets(
        search, timed, work.sets, groups, self_pos, truth, n_rows=work.n, recall_k=cfg.recall_k
    )
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
        on_stage=on_stage,
    )


def target_of(config: IndexConfig, result: TuneResult | None) -> dict[str, Any]:
    return {
        "recall_k": config.recall_k,
        "recall": config.recall_target,
        "met": result.target_met if result else None,
        "latency_budget_ms": config.latency_budget_ms,
        "latency_met": result.latency_met if result else None,
    }


def write_staged(
    table: CacheTable,
    index: faiss.Index,
    ids: np.ndarray,
    staged: Path | None,
    cfg: IndexConfig,
    *,
    selection: dict[str, Any],
    result: TuneResult | None,
    sets: list[dict[str, Any]],
    latency: dict[str, Any],
    timings: dict[str, float],
    extra: dict[str, Any],
    selection_reason: str | None,
    on_stage: StageHook | None = None,
) -> Path:
    """Write index, ids and manifest into ``staged`` (a new staging directory if None)."""
    staged = staged if staged is not None else new_staging_dir(cfg.dir)
    try:
        write_version_index(index, staged / INDEX_FILE)
        np.save(staged / IDS_FILE, ids.astype(np.int64))
        if on_stage:
            on_stage("index_written")
        # What loading puts in RAM; an on-disk index's codes (storage.ivfdata_bytes) are paged
        # in from its memory-mapped file as searches touch them.
        memory = (staged / INDEX_FILE).stat().st_size + (staged / IDS_FILE).stat().st_size
        storage = storage_of(index, staged) | extra.get("storage", {})
        manifest = (
            build_manifest(
                key=selection["key"],
                dim=int(index.d),
                ntotal=int(index.ntotal),
                search_params=result.params if result else {},
                selection=selection,
                target=target_of(cfg, result),
                query_sets=sets,
                headline=worst_trusted(sets, cfg.recall_k),
                latency=latency,
                memory_bytes=memory,
                timings=timings,
                table=table_identity(table, ids),
                software={"faiss": faiss.__version__, "autofaiss": autofaiss.__version__},
                trials=[t.__dict__ for t in result.trials] if result else [],
                selection_reason=selection_reason,
            )
            | extra
            | {"storage": storage}
        )
        write_manifest_files(staged, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def write_manifest_files(staged: Path, manifest: dict[str, Any]) -> None:
    """Record the checksums of the version's files and write its manifest."""
    # (`cachebind index verify`: an index that loads but has a flipped bit returns wrong
    # neighbours without any error.)
    files = [INDEX_FILE, IDS_FILE, *version_files(manifest)]
    manifest["files"] = file_digests(staged, files)
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def _probe(work: Work) -> np.ndarray:
    """Latency probes for a table too small for held-out queries (one row)."""
    return read_positions(work.table.dataset, np.arange(min(work.n, 64)))


def build_index(
    table: CacheTable,
    config: IndexConfig,
    progress: bool = True,
    *,
    queries: np.ndarray | None = None,
    query_files: QueryFiles | None = None,
    shards: int | None = None,
    ray_address: str | None = None,
    index_key: str | None = None,
    on_stage: StageHook | None = None,
    lineage: dict[str, Any] | None = None,
    escalate_forced: bool = False,
) -> Path:
    """Build, tune and verify a new index of ``table``; returns its complete staging directory.

    Nothing is published (see :func:`publish`). ``queries``: held-out queries to tune on instead
    of sampled table rows. ``query_files``: more query sets, ``[(modality, path)]``. ``shards``
    > 1 adds the rows in parallel Ray tasks (:mod:`indexing.shards`) after training once on the
    driver. ``index_key`` forces a FAISS factory key instead of the selection (it is still
    tuned, and only escalated with ``escalate_forced``). ``on_stage`` is called as the build
    passes each stage (progress reporting; tests use it to crash a build mid-way).
    ``lineage``: manifest fields saying where this build came from (a rebuild by ``add_rows``).
    """
    t0 = time.perf_counter()
    work = _prepare(table, config, queries, query_files)
    work.timings["prepare_s"] = time.perf_counter() - t0
    selection = _select(work.n, work.dim, config)
    if index_key is not None:
        budget = config.memory_budget_gb * 2**30
        selection = Selection(
            index_key,
            "forced by the caller",
            train_size_for(index_key, work.n, work.dim, budget),
            selection.autofaiss_keys,
        )
    log.info("index for %d x %d: %s (%s)", work.n, work.dim, selection.key, selection.reason)
    # Decided before training, so a key that cannot be merged as asked fails fast.
    merge = plan_merge(selection.key, work.n, work.dim, config, int(shards or 1))
    log.info("shards merge %s: %s", "on disk" if merge.on_disk else "in memory", merge.reason)
    index = _train(work, selection, progress)
    if on_stage:
        on_stage("trained")

    # An on-disk merge writes the version's ivfdata straight into its staging directory.
    staged = new_staging_dir(config.dir) if merge.on_disk else None
    try:
        t0 = time.perf_counter()
        if shards and shards > 1:
            from indexing.shards import add_sharded

            index, ids = add_sharded(
                index,
                table,
                work,
                shards,
                ray_address=ray_address,
                progress=progress,
                ivfdata=staged / IVFDATA_FILE if staged is not None else None,
                shard_dir=config.shard_dir,
                on_stage=on_stage,
            )
        else:
            ids = add_range(index, table.dataset, 0, work.n, work.exact, progress=progress)
        work.timings["add_s"] = time.perf_counter() - t0
        if on_stage:
            on_stage("added")
    except BaseException:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    return _finish(
        work,
        index,
        ids,
        selection.to_dict(),
        progress=progress,
        on_stage=on_stage,
        extra={
            "parent_version": None,
            "shards": int(shards or 1),
            "storage": {"reason": merge.reason},
        }
        | (lineage or {}),
        staged=staged,
        may_escalate=index_key is None or escalate_forced,
    )


def build_and_publish(
    store_cfg: StoreConfig,
    index_cfg: IndexConfig,
    *,
    progress: bool = True,
    table_version: int | None = None,
    shards: int | None = None,
    ray_address: str | None = None,
    index_key: str | None = None,
    query_files: QueryFiles | None = None,
) -> dict[str, Any]:
    """``cachebind index``: build a new version of the table's index and make it CURRENT.

    Returns the published manifest.
    """
    table = CacheTable.open(store_cfg, version=table_version)
    staged = build_index(
        table,
        index_cfg,
        progress,
        shards=shards,
        ray_address=ray_address,
        index_key=index_key,
        query_files=query_files,
    )
    version = publish(index_cfg.dir, staged, index_cfg.keep_versions)
    return read_manifest(index_cfg.dir, version)
