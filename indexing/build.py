"""Build a version: select -> train -> add -> tune -> measure -> write (staged), then publish.

Every path (a single build, a sharded Ray build, an incremental add) runs the same steps:

* held-out queries: ``N_QUERIES`` table rows sampled with a fixed seed and kept out of the
  training sample; their exact top-100 (leave-one-out, see :mod:`indexing.recall`) is computed
  while the rows stream into the index, so the table is read once;
* tuning toward recall@k >= target (:mod:`indexing.tune`), then recall@1/10/100 and latency at
  batch 1 and 64 measured with the chosen parameters;
* the files and the manifest are written into a staging directory that only
  :func:`indexing.versions.publish` moves into ``versions/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import autofaiss
import faiss
import numpy as np
from tqdm.auto import tqdm

from cachebind.config import IndexConfig, StoreConfig
from cachebind.errors import IndexMismatchError
from cachebind.store import CacheTable
from cachebind.store.table import vectors_to_numpy
from indexing.faiss_ops import new_index
from indexing.gpu import gpu_memory_bytes, gpu_wanted, to_gpu
from indexing.manifest import MANIFEST_FORMAT, ids_checksum, table_identity
from indexing.ondisk import IVFDATA_FILE, CopyOnWriteAdd, is_ondisk, plan_merge, storage_of
from indexing.ondisk import write_index as write_version_index
from indexing.params import apply_search_params, search_grid
from indexing.recall import ExactTopK, drop_self
from indexing.select import Selection, outgrown, select_index, train_size_for
from indexing.tune import leave_one_out_recall, measure_latency, tune
from indexing.versions import (
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    current_version,
    file_digests,
    new_staging_dir,
    publish,
    read_manifest,
    version_files,
    versions_dir,
)

log = logging.getLogger(__name__)

N_QUERIES = 1000
"""Held-out queries for tuning and recall: enough for +-1% on recall@10."""
RECALL_KS = (1, 10, 100)
READ_BATCH = 32_768
KMEANS_ITERATIONS = 10
SEED = 0

StageHook = Callable[[str], None]
"""Called with a stage name ("trained", "added", "tuned", "index_written"; a sharded on-disk
merge also "shards_written") as a build passes it."""


@dataclass
class Work:
    """What a build carries from step to step."""

    table: CacheTable
    config: IndexConfig
    n: int
    dim: int
    query_positions: np.ndarray
    queries: np.ndarray
    exact: ExactTopK
    timings: dict[str, float] = field(default_factory=dict)


def dataset_of(table: CacheTable) -> Any:
    return table.dataset


def read_positions(dataset: Any, positions: np.ndarray) -> np.ndarray:
    """Vectors (float32) of the rows at ``positions`` (sorted), in that order."""
    out = []
    for s in range(0, len(positions), READ_BATCH):
        chunk = dataset.take(positions[s : s + READ_BATCH].tolist(), columns=["vector"])
        out.append(vectors_to_numpy(chunk.column("vector")))
    if not out:
        return np.zeros((0, dataset.schema.field("vector").type.list_size), np.float32)
    return np.ascontiguousarray(np.concatenate(out))


def add_range(
    index: faiss.Index | None,
    dataset: Any,
    start: int,
    stop: int,
    exact: ExactTopK | None,
    *,
    add_from: int = 0,
    progress: bool = False,
    desc: str = "adding",
) -> np.ndarray:
    """Stream rows [start, stop) in table order: add those at ``>= add_from`` to ``index``,
    feed all to the exact ground truth; return the ids of the rows read."""
    ids = []
    bar = tqdm(total=stop - start, desc=desc, unit="row", disable=not progress, leave=False)
    position = start
    for batch in dataset.to_batches(
        columns=["id", "vector"], offset=start, limit=stop - start, batch_size=READ_BATCH
    ):
        if batch.num_rows == 0:
            continue
        x = np.ascontiguousarray(vectors_to_numpy(batch.column("vector")))
        if index is not None and position + len(x) > add_from:
            index.add(x[max(0, add_from - position) :])
        if exact is not None:
            exact.add(x, position)
        ids.append(batch.column("id").to_numpy())
        position += len(x)
        bar.update(len(x))
    bar.close()
    if position != stop:
        raise RuntimeError(f"read {position - start} rows of [{start}, {stop}): table changed?")
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def _prepare(table: CacheTable, config: IndexConfig, queries: np.ndarray | None) -> Work:
    n, dim = table.count(), table.dim
    if n == 0:
        raise ValueError("the table is empty: nothing to index")
    rng = np.random.default_rng(SEED)
    if queries is not None:  # the caller's own held-out queries (e.g. text embeddings)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        positions = np.full(len(q), -1, np.int64)
    else:
        nq = min(N_QUERIES, n) if n > 1 else 0
        positions = np.sort(rng.choice(n, nq, replace=False)).astype(np.int64)
        q = read_positions(table.dataset, positions)
    k_truth = min(max(RECALL_KS), n - 1) + 1  # +1: room for the query's own row
    return Work(table, config, n, dim, positions, q, ExactTopK(q, k_truth))


def _select(n: int, dim: int, config: IndexConfig) -> Selection:
    gpu_bytes = gpu_memory_bytes() if gpu_wanted(config.use_gpu) else None
    return select_index(n, dim, config.memory_budget_gb, gpu_memory_bytes=gpu_bytes)


def _train(work: Work, selection: Selection, progress: bool) -> faiss.Index:
    index = new_index(work.dim, selection.key)
    if selection.train_size and not index.is_trained:
        rng = np.random.default_rng(SEED + 1)
        pool = np.setdiff1d(np.arange(work.n), work.query_positions, assume_unique=True)
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
        work.timings["train_s"] = time.perf_counter() - t0
    return index


def _search_fn(index: faiss.Index) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(np.ascontiguousarray(q, dtype=np.float32), k)

    return search


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
) -> Path:
    """Tune, measure, and write the staged version; returns the staging directory.

    ``staged``: the staging directory when the build already wrote into it (an on-disk index's
    ivfdata); like one created here, it is removed if anything fails.
    """
    try:
        return _tune_and_write(work, index, ids, selection, progress, on_stage, extra, staged)
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
) -> Path:
    cfg = work.config
    if index.ntotal != work.n or len(ids) != work.n:
        raise RuntimeError(f"index holds {index.ntotal} rows, the table {work.n}")
    self_pos = work.query_positions
    truth = drop_self(work.exact.positions, self_pos, work.exact.k - 1)
    search = _search_fn(index)
    k = min(cfg.recall_k, work.n - 1)
    t0 = time.perf_counter()
    on_gpu = selection.get("device") == "gpu"
    if len(work.queries) and k >= 1:
        result = tune(
            search,
            lambda p: apply_search_params(index, p),
            search_grid(index, gpu=on_gpu),
            work.queries,
            self_pos,
            truth,
            k=k,
            target=cfg.recall_target,
            latency_budget_ms=cfg.latency_budget_ms,
            progress=progress,
        )
        params, target_met, latency_met = result.params, result.target_met, result.latency_met
        trials = [t.__dict__ for t in result.trials]
    else:
        params, target_met, latency_met, trials = {}, None, None, []
    work.timings["tune_s"] = time.perf_counter() - t0
    if on_stage:
        on_stage("tuned")

    t0 = time.perf_counter()
    recall = {}
    for kk in RECALL_KS:
        if len(work.queries) and kk <= work.n - 1:
            recall[str(kk)], _, _ = leave_one_out_recall(search, work.queries, self_pos, truth, kk)
    # Latency is measured with what serving will use: the GPU searcher when there is one.
    gpu_searcher = to_gpu(index, selection["key"]) if on_gpu else None
    timed = gpu_searcher.search if gpu_searcher is not None else search
    probes = work.queries if len(work.queries) else _probe(work)
    latency = measure_latency(timed, probes, cfg.recall_k, progress=progress)
    work.timings["measure_s"] = time.perf_counter() - t0

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
            {
                "format": MANIFEST_FORMAT,
                "version": None,  # given by publish()
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "index_key": selection["key"],
                "metric": "inner_product",
                "dim": work.dim,
                "ntotal": int(index.ntotal),
                "search_params": params,
                "selection": selection,
                "target": {
                    "recall_k": cfg.recall_k,
                    "recall": cfg.recall_target,
                    "met": target_met,
                    "latency_budget_ms": cfg.latency_budget_ms,
                    "latency_met": latency_met,
                },
                "recall": recall,
                "recall_queries": {
                    "count": len(work.queries),
                    "kind": "held-out table rows, leave-one-out"
                    if (self_pos >= 0).any()
                    else "caller-supplied queries",
                },
                "latency_ms": latency,
                "memory_bytes": int(memory),
                "build_time_s": {k: round(v, 3) for k, v in work.timings.items()}
                | {"total_s": round(sum(work.timings.values()), 3)},
                "table": table_identity(work.table, ids),
                "software": {"faiss": faiss.__version__, "autofaiss": autofaiss.__version__},
                "tuning_trials": trials,
            }
            | extra
            | {"storage": storage}
        )
        # Checksums of what the version is made of, for `cachebind index verify` (an index
        # that loads but has a flipped bit returns wrong neighbours without any error).
        files = [INDEX_FILE, IDS_FILE, *version_files(manifest)]
        manifest["files"] = file_digests(staged, files)
        (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _probe(work: Work) -> np.ndarray:
    """Latency probes for a table too small for held-out queries (one row)."""
    return read_positions(work.table.dataset, np.arange(min(work.n, 64)))


def build_index(
    table: CacheTable,
    config: IndexConfig,
    progress: bool = True,
    *,
    queries: np.ndarray | None = None,
    shards: int | None = None,
    ray_address: str | None = None,
    index_key: str | None = None,
    on_stage: StageHook | None = None,
    lineage: dict[str, Any] | None = None,
) -> Path:
    """Build, tune and verify a new index of ``table``; returns its complete staging directory.

    Nothing is published (see :func:`publish`). ``queries``: held-out queries to tune on instead
    of sampled table rows. ``shards`` > 1 adds the rows in parallel Ray tasks
    (:mod:`indexing.shards`) after training once on the driver. ``index_key`` forces a FAISS
    factory key instead of the selection (it is still tuned). ``on_stage`` is called as the
    build passes each stage (progress reporting; tests use it to crash a build mid-way).
    ``lineage``: manifest fields saying where this build came from (a rebuild by ``add_rows``).
    """
    t0 = time.perf_counter()
    work = _prepare(table, config, queries)
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
) -> dict[str, Any]:
    """``cachebind index``: build a new version of the table's index and make it CURRENT.

    Returns the published manifest.
    """
    table = CacheTable.open(store_cfg, version=table_version)
    staged = build_index(
        table, index_cfg, progress, shards=shards, ray_address=ray_address, index_key=index_key
    )
    version = publish(index_cfg.dir, staged, index_cfg.keep_versions)
    return read_manifest(index_cfg.dir, version)


def add_rows(
    index_dir: Path,
    table: CacheTable,
    config: IndexConfig,
    progress: bool = True,
    *,
    on_stage: StageHook | None = None,
    shards: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Add the rows appended to ``table`` since the current version, without retraining.

    The current version's rows must be a prefix of the table (same ids in the same order, by
    checksum); otherwise the table was rewritten, not appended to, and IndexMismatchError says
    to rebuild. The result is published as a new version whose manifest names its parent;
    search parameters are re-tuned and recall re-measured on the grown index.

    When the grown table has outgrown the current index (:func:`indexing.select.outgrown`: a
    Flat index past the exact-search size, an IVF sized for a sixteenth of the rows, a key
    that no longer fits the memory budget), a full build replaces it instead, unless
    ``config.rebuild_when_outgrown`` is off; the manifest's ``update`` says which happened and
    why (``{"mode": "added" | "rebuilt", "reason": ...}``). ``shards``/``ray_address`` are
    used by such a rebuild (a sharded Ray build, as ``build_and_publish``).
    """
    index_dir = Path(index_dir)
    parent = current_version(index_dir)
    if parent is None:
        raise FileNotFoundError(f"no published index in {index_dir}: build one first")
    old = read_manifest(index_dir, parent)
    folder = versions_dir(index_dir) / parent
    n_old = int(old["table"]["row_count"])
    table_ids = table.ids()
    if len(table_ids) < n_old or ids_checksum(table_ids[:n_old]) != old["table"]["ids_sha256"]:
        raise IndexMismatchError(
            f"the table (version {table.version}, {len(table_ids)} rows) does not extend the rows "
            f"index {parent} was built from ({n_old} rows, table version "
            f"{old['table']['version']}): rows were changed or removed, rebuild the index"
        )
    config = config.model_copy(update={"dir": index_dir})
    lineage: dict[str, Any] = {"parent_version": parent, "added_rows": int(len(table_ids) - n_old)}
    gpu_seen = gpu_wanted(config.use_gpu) and gpu_memory_bytes() is not None
    reason = outgrown(
        old["selection"], _select(len(table_ids), table.dim, config), gpu_seen=gpu_seen
    )
    if reason is not None and config.rebuild_when_outgrown:
        log.info("rebuilding instead of adding: %s", reason)
        staged = build_index(
            table,
            config,
            progress,
            shards=shards,
            ray_address=ray_address,
            on_stage=on_stage,
            lineage=lineage | {"update": {"mode": "rebuilt", "reason": reason}},
        )
        version = publish(index_dir, staged, config.keep_versions)
        return read_manifest(index_dir, version)
    if reason is not None:
        log.warning("adding to an outgrown index (rebuild_when_outgrown is off): %s", reason)
    work = _prepare(table, config, None)
    # An on-disk version grows copy-on-write: new rows in memory, then merged with the parent's
    # lists into the new version's own ivfdata (indexing/ondisk.py).
    grow = CopyOnWriteAdd(folder, old, index_dir, n_old) if is_ondisk(old) else None
    index = grow.adder if grow else faiss.read_index(str(folder / INDEX_FILE))
    t0 = time.perf_counter()
    ids = add_range(index, table.dataset, 0, work.n, work.exact, add_from=n_old, progress=progress)
    work.timings["add_s"] = time.perf_counter() - t0
    if on_stage:
        on_stage("added")
    into = None
    if grow is not None:
        index, into = grow.merge()
    update = {
        "mode": "added",
        "reason": f"added although outgrown (rebuild_when_outgrown is off): {reason}"
        if reason
        else "the index still suits the grown table",
    }
    staged = _finish(
        work,
        index,
        ids,
        old["selection"],
        progress=progress,
        on_stage=on_stage,
        extra=lineage | {"shards": 1, "update": update},
        staged=into,
    )
    version = publish(index_dir, staged, config.keep_versions)
    return read_manifest(index_dir, version)
