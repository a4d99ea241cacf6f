"""The sharded build on a Ray cluster: train once, add shards in parallel, merge in order.

The driver trains the index on a sample (:mod:`indexing.steps.build`) and puts the trained,
empty index in the object store. Each Ray task opens the table at the pinned version, streams
its row range into its own copy (and computes the exact top-k of the held-out queries over its
rows). The driver then merges the shards in row order, which gives the same index a single
build produces, in one of two ways (:func:`indexing.mechanics.ondisk.plan_merge` chooses):

* in memory: each task returns its filled index serialised and the driver appends them
  (:func:`indexing.mechanics.faiss_ops.merge_into`: inverted lists appended, labels shifted).
  Simple, and the only way for indexes without on-disk inverted lists (Flat, fast-scan,
  ``RFlat``), but the driver holds every shard and the merged index at once;
* on disk (IVF indexes): each task stores its rows under their table positions and writes only
  its inverted lists to a file, on ``IndexConfig.shard_dir`` (a shared file system) or, unset,
  through the object store to the driver, which spools them one at a time into the staging
  folder. The driver memory-maps the files and merges them into the version's ``index.ivfdata``
  (:mod:`indexing.mechanics.ondisk`), so a 100M-row cache is built by as many workers as the
  cluster has, with one shard per task in memory and none of the codes in the driver's.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import ray
from tqdm.auto import tqdm

from cachebind.raycluster import start_or_join_ray
from cachebind.store import CacheTable
from indexing.mechanics import ondisk
from indexing.mechanics.faiss_ops import from_bytes, merge_into, to_bytes
from indexing.quality.recall import ExactTopK
from indexing.steps.rows import Work, add_range

log = logging.getLogger(__name__)


def _open_dataset(uri: str, version: int, storage_options: dict[str, str] | None) -> Any:
    import lance

    return lance.dataset(uri, version=version, storage_options=storage_options)


# A task whose worker or node dies is run again elsewhere (it only reads the pinned table
# version by URI and returns its shard), so a node lost mid-build changes nothing.
@ray.remote(num_cpus=1, max_retries=3)
def add_shard(
    trained: np.ndarray,
    uri: str,
    version: int,
    storage_options: dict[str, str] | None,
    start: int,
    stop: int,
    queries: np.ndarray,
    k_truth: int,
    invlists: bool = False,
    out_path: str | None = None,
    column: str = "vector",
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Rows [start, stop) of the table at ``version`` -> (payload, ids, truth D, truth I).

    The payload is the filled index serialised; with ``invlists``, only its inverted lists
    (rows stored under their table positions): written to ``out_path`` (a
    :class:`~indexing.mechanics.ondisk.ShardLists`), or without one, ``(file bytes, ShardLists)``.
    """
    faiss.omp_set_num_threads(1)  # one CPU per task, as Ray scheduled it
    index = from_bytes(trained)
    exact = ExactTopK(queries, k_truth)
    target = ondisk.AddAtPositions(index, start) if invlists else index
    dataset = _open_dataset(uri, version, storage_options)
    ids = add_range(target, dataset, start, stop, exact, column=column)
    payload: Any
    if not invlists:
        payload = to_bytes(index)
    elif out_path is not None:
        payload = ondisk.write_shard(index, Path(out_path))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            shard = ondisk.write_shard(index, Path(tmp) / "shard")
            payload = (np.fromfile(shard.path, dtype=np.uint8), shard)
    return payload, ids, exact.scores, exact.positions


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous row ranges covering [0, n) (fewer if n is small)."""
    bounds = np.linspace(0, n, min(shards, max(n, 1)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def add_sharded(
    index: faiss.Index,
    table: CacheTable,
    work: Work,
    shards: int,
    *,
    ray_address: str | None = None,
    progress: bool = True,
    ivfdata: Path | None = None,
    shard_dir: Path | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[faiss.Index, np.ndarray]:
    """Fill the trained ``index`` with all rows using Ray tasks; fills ``work.exact`` too.

    ``ivfdata``: merge on disk into this file (in the build's staging folder); the shards'
    files go to ``shard_dir`` when given (seen by every node), else next to ``ivfdata``.
    ``on_stage`` hears ``shards_written`` (all shard files complete, merge about to start).
    """
    start_or_join_ray(ray_address, log_to_driver=False)
    uri = str(table.dataset.uri)
    trained = ray.put(to_bytes(index))
    queries = ray.put(work.queries)
    ranges = shard_ranges(work.n, shards)
    # The tasks reach an object-store table with the driver's options (their own environment
    # may lack the credentials); the options travel as task arguments, once per shard.
    options = table.storage_options
    on_disk = ivfdata is not None
    files: Path | None = None
    if ivfdata is not None:
        # One folder per build, so concurrent builds sharing a shard_dir never clash.
        root = Path(shard_dir) if shard_dir is not None else Path(ivfdata).parent
        files = root / f"shards-{uuid.uuid4().hex[:12]}"
        files.mkdir(parents=True)

    def out_path(i: int) -> str | None:
        return str(files / f"shard-{i:05d}{ondisk.SHARD_SUFFIX}") if files else None

    shared = shard_dir is not None
    pending = {
        add_shard.remote(
            trained,
            uri,
            int(table.version),
            options,
            a,
            b,
            queries,
            work.exact.k,
            on_disk,
            out_path(i) if shared else None,
            table.column,
        ): i
        for i, (a, b) in enumerate(ranges)
    }
    results: dict[int, tuple] = {}
    try:
        bar = tqdm(total=len(ranges), desc="adding shards", unit="shard", disable=not progress)
        with bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    payload, shard_ids, truth_scores, truth_positions = ray.get(ref)
                    del ref  # drop the object store's copy as soon as it is consumed
                    if on_disk and not shared:
                        data, shard = payload
                        data.tofile(out_path(i))
                        payload = dataclasses.replace(shard, path=out_path(i))
                        del data
                    results[i] = (payload, shard_ids, truth_scores, truth_positions)
                    bar.update(1)
        order = range(len(ranges))  # row order: the index a single build would produce
        for i in order:
            part = ExactTopK(work.queries, work.exact.k)
            part.scores, part.positions = results[i][2], results[i][3]
            work.exact.merge(part)
        ids = np.concatenate([results[i][1] for i in order])
        if ivfdata is not None:
            if on_stage:
                on_stage("shards_written")
            t0 = time.perf_counter()
            ivf = faiss.extract_index_ivf(index)
            parts = [ondisk.open_shard(results[i][0], ivf.nlist, ivf.code_size) for i in order]
            merged = ondisk.merge(index, parts, Path(ivfdata))
            del parts  # unmap the shard files before they are removed
            seconds = time.perf_counter() - t0
            log.info("merged %d shards into %s in %.1f s", len(order), ivfdata, seconds)
            return merged, ids
        merged = from_bytes(results[0][0])
        for i in order[1:]:
            merge_into(merged, from_bytes(results[i][0]))
        return merged, ids
    finally:
        for ref in pending:  # a failed build: stop the tasks still adding
            ray.cancel(ref)
        if files is not None:
            shutil.rmtree(files, ignore_errors=True)
