"""The sharded build on a Ray cluster: train once, add shards in parallel, merge in order.

The driver trains the index on a sample (:func:`indexing.build._train`) and puts the trained,
empty index in the object store. Each Ray task opens the table at the pinned version, streams
its row range into its own copy (and computes the exact top-k of the held-out queries over its
rows), and returns the filled index serialised. The driver merges the shards in row order
(:func:`indexing.faiss_ops.merge_into`: inverted lists appended, labels shifted), which gives
the same index a single build produces, so a 100M-row cache is built by as many workers as the
cluster has, while memory per task is one shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import ray
from tqdm.auto import tqdm

from cachebind.store import CacheTable
from indexing.faiss_ops import from_bytes, merge_into, to_bytes
from indexing.recall import ExactTopK

if TYPE_CHECKING:
    from indexing.build import Work


def _open_dataset(uri: str, version: int, storage_options: dict[str, str] | None) -> Any:
    import lance

    return lance.dataset(uri, version=version, storage_options=storage_options)


@ray.remote(num_cpus=1)
def add_shard(
    trained: np.ndarray,
    uri: str,
    version: int,
    storage_options: dict[str, str] | None,
    start: int,
    stop: int,
    queries: np.ndarray,
    k_truth: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows [start, stop) of the table at ``version`` -> (index bytes, ids, truth D, truth I)."""
    from indexing.build import add_range

    faiss.omp_set_num_threads(1)  # one CPU per task, as Ray scheduled it
    index = from_bytes(trained)
    exact = ExactTopK(queries, k_truth)
    ids = add_range(index, _open_dataset(uri, version, storage_options), start, stop, exact)
    return to_bytes(index), ids, exact.scores, exact.positions


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
) -> tuple[faiss.Index, np.ndarray]:
    """Fill the trained ``index`` with all rows using Ray tasks; fills ``work.exact`` too."""
    if not ray.is_initialized():
        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
    uri = str(table.dataset.uri)
    trained = ray.put(to_bytes(index))
    queries = ray.put(work.queries)
    ranges = shard_ranges(work.n, shards)
    # The tasks reach an object-store table with the driver's options (their own environment
    # may lack the credentials); the options travel as task arguments, once per shard.
    options = table.storage_options
    refs = [
        add_shard.remote(trained, uri, int(table.version), options, a, b, queries, work.exact.k)
        for a, b in ranges
    ]
    results: dict[int, tuple] = {}
    pending = {ref: i for i, ref in enumerate(refs)}
    with tqdm(total=len(refs), desc="adding shards", unit="shard", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                bar.update(1)
    # Merge in row order: the result is the index a single build would produce.
    merged = from_bytes(results[0][0])
    ids = [results[0][1]]
    for i in range(len(ranges)):
        blob, shard_ids, truth_scores, truth_positions = results[i]
        if i:
            merge_into(merged, from_bytes(blob))
            ids.append(shard_ids)
        part = ExactTopK(work.queries, work.exact.k)
        part.scores, part.positions = truth_scores, truth_positions
        work.exact.merge(part)
    return merged, np.concatenate(ids)
