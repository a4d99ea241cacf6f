"""Choose the index key for a table under a memory budget: the one place a key is chosen
(:func:`select_for`; when tuning cannot reach the target, :mod:`indexing.steps.escalate` walks
:func:`stronger_keys`).

The rules, measured on 2 CPU cores with clustered 1024-d vectors (benchmarks/bench_index.py):

* small tables (< ``FLAT_MAX_ROWS``) get exact ``Flat`` inner-product search: nothing to train,
  recall 1.0, and a single query scans 50k x 1024 float32 (200 MB) in ~10 ms (186 ms measured
  at 1M rows), while an IVF build of that size costs ~15 s of k-means and tuning;
* a GPU that holds the whole cache as fp16 gets exact ``Flat`` too (moved to the GPU at load);
* when the float32 vectors fit the budget, an IVF fast-scan PQ shortlist re-ranked exactly
  (``IVF<n>,PQ<d/4>x4fs,RFlat``).  autofaiss proposes HNSW here; we do not take it because HNSW
  cannot be built as shards and merged (the Ray build), is slow to build on few cores, and the
  re-ranked IVF reaches the same recall at a higher QPS on this data;
* otherwise the vectors must be compressed: autofaiss's quantized key for the budget
  (``OPQ<m>_<y>,IVF<n>_HNSW32,PQ<m>x8``), which is what it does well.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from autofaiss.external.optimize import get_optimal_index_keys_v2, get_optimal_quantization

from cachebind.config import IndexConfig
from cachebind.published.gpu import gpu_memory_bytes, gpu_wanted

FLAT_MAX_ROWS = 50_000
"""Below this many rows an exact scan is fast enough that an approximate index is not worth it."""
MAX_TRAIN_ROWS = 1_000_000
"""k-means on more points than this improves nothing measurable and costs minutes."""
GPU_FLAT_FRACTION = 0.8
"""Share of GPU memory the fp16 matrix may take (the rest: query batches, top-k buffers)."""
NLIST_GROWTH_REBUILD = 4
"""Rebuild an IVF whose table now wants this many times its lists (16x the rows it was sized
for): its lists are then ~16x longer than planned, so every probe scans ~16x more codes, and its
centroids were trained on a sample of a small fraction of today's rows."""


@dataclass(frozen=True)
class Selection:
    """The chosen index key and why."""

    key: str
    reason: str
    train_size: int
    """Rows to sample for training (0: the index needs no training)."""
    autofaiss_keys: tuple[str, ...]
    """What autofaiss proposed for this size and budget (its best first), for the record."""
    device: str = "cpu"
    """Where the index is meant to be searched: ``cpu`` or ``gpu`` (moved there at load)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["autofaiss_keys"] = list(self.autofaiss_keys[:4])
        return d


def nb_lists(n: int) -> int:
    """Inverted lists for an IVF over ``n`` rows: the power of two nearest 2*sqrt(n).

    faiss's guideline is 4..16*sqrt(n); with an exact re-rank behind a fast-scan shortlist,
    fewer, longer lists train 4x faster on few cores (k-means costs ~nlist^2) at the same recall.
    """
    target = 2.0 * math.sqrt(max(n, 1))
    return int(min(65_536, max(16, 2 ** round(math.log2(target)))))


def ivf_nlist(key: str) -> int | None:
    """The number of inverted lists in an index key (None for non-IVF keys)."""
    m = re.search(r"IVF(\d+)", key)
    return int(m.group(1)) if m else None


def train_size_for(key: str, n: int, dim: int, budget_bytes: float) -> int:
    """Training rows: 40 per centroid (faiss warns below 39), capped by the budget and 1M."""
    nlist = ivf_nlist(key)
    if nlist is None:
        return 0
    by_budget = int(budget_bytes / 4 / (dim * 4))  # a quarter of the budget for the sample
    return int(max(min(n, 40 * nlist, MAX_TRAIN_ROWS, max(by_budget, 256)), min(n, 256)))


def _full_vectors_key(n: int, dim: int) -> tuple[str, int]:
    nlist = nb_lists(n)
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= 32_768 else f"IVF{nlist}"
    # 4-bit fast-scan codes of 4 dims per sub-quantizer at 1024-d (128 bytes a vector); small
    # dims get 2 dims per sub-quantizer, or the shortlist is too coarse to re-rank cheaply.
    m = dim // 4 if dim >= 256 else dim // 2
    if dim % (dim // m) == 0 and m % 2 == 0:
        return f"{quantizer},PQ{m}x4fs,RFlat", nlist
    return f"{quantizer},Flat", nlist


def full_vectors_bytes(n: int, dim: int) -> int:
    """RAM of ``IVF,PQ(d/4)x4fs,RFlat``: float32 vectors + 4-bit codes + ids + centroids."""
    nlist = nb_lists(n)
    return n * (4 * dim + dim // 4 + 8) + nlist * dim * 4


def select_index(
    n: int,
    dim: int,
    memory_budget_gb: float,
    *,
    gpu_memory_bytes: int | None = None,
) -> Selection:
    """The index key for ``n`` rows of ``dim``-d unit vectors within ``memory_budget_gb``."""
    budget = memory_budget_gb * 2**30
    try:
        proposed = tuple(get_optimal_index_keys_v2(max(n, 1), dim, f"{int(budget)}B"))
    except (ValueError, ZeroDivisionError):
        proposed = ()

    if gpu_memory_bytes and n * dim * 2 <= GPU_FLAT_FRACTION * gpu_memory_bytes:
        return Selection(
            "Flat",
            f"{n} x {dim} fp16 ({n * dim * 2 / 2**30:.2f} GiB) fits the GPU: exact search",
            0,
            proposed,
            device="gpu",
        )
    if n < FLAT_MAX_ROWS and n * dim * 4 <= budget:
        return Selection("Flat", f"{n} < {FLAT_MAX_ROWS} rows: exact search", 0, proposed)
    if full_vectors_bytes(n, dim) <= budget:
        key, _ = _full_vectors_key(n, dim)
        return Selection(
            key,
            "float32 vectors fit the budget: IVF fast-scan shortlist re-ranked exactly "
            f"(autofaiss proposed {proposed[0] if proposed else 'nothing'}; HNSW is not "
            "shardable/mergeable and slower to build)",
            train_size_for(key, n, dim, budget),
            proposed,
        )
    quantized = [k for k in proposed if k.startswith(("OPQ", "IVF")) and "PQ" in k]
    if not quantized:
        quantized = get_optimal_quantization(n, dim, force_max_index_memory_usage=f"{int(budget)}B")
    if not quantized:
        raise ValueError(
            f"no index of {n} x {dim} vectors fits {memory_budget_gb} GiB: raise "
            "IndexConfig.memory_budget_gb"
        )
    key = quantized[0]
    return Selection(
        key,
        f"float32 vectors ({full_vectors_bytes(n, dim) / 2**30:.2f} GiB) exceed the "
        f"{memory_budget_gb} GiB budget: autofaiss's quantized key",
        train_size_for(key, n, dim, budget),
        proposed,
    )


def select_for(n: int, dim: int, config: IndexConfig, forced: str | None = None) -> Selection:
    """The key for ``n`` rows under ``config`` (the GPU's memory counted when it is wanted);
    ``forced``: the caller's key instead, still sized for the budget."""
    gpu_bytes = gpu_memory_bytes() if gpu_wanted(config.use_gpu) else None
    selection = select_index(n, dim, config.memory_budget_gb, gpu_memory_bytes=gpu_bytes)
    if forced is None:
        return selection
    budget = config.memory_budget_gb * 2**30
    return Selection(
        forced,
        "forced by the caller",
        train_size_for(forced, n, dim, budget),
        selection.autofaiss_keys,
    )


def family(key: str) -> str:
    """What a key builds: ``flat``, ``refine`` (IVF + exact re-rank) or ``quantized``."""
    if key == "Flat":
        return "flat"
    if key.endswith(",RFlat") or key.endswith(",Flat"):
        return "refine"
    return "quantized"


def outgrown(parent: dict, fresh: Selection, *, gpu_seen: bool) -> str | None:
    """Why an index selected as ``parent`` (a manifest's ``selection``) no longer suits the
    table that ``fresh`` was selected for; ``None`` when adding rows to it is still right.

    A key the caller forced is kept: the caller chose it knowing the table. An index chosen
    for a GPU is judged only where a GPU is seen (``gpu_seen``): rows are often appended on a
    CPU machine for an index that a GPU box serves.
    """
    key = str(parent["key"])
    if parent.get("reason") == "forced by the caller":
        return None
    if parent.get("device", "cpu") == "gpu" and not gpu_seen:
        return None
    if parent.get("device", "cpu") != fresh.device:
        return f"{key} was chosen for the {parent.get('device', 'cpu')}; now: {fresh.reason}"
    if family(key) != family(fresh.key):
        return f"{key} no longer fits the table: {fresh.reason} ({fresh.key})"
    old_lists, new_lists = ivf_nlist(key), ivf_nlist(fresh.key)
    if old_lists and new_lists and new_lists >= NLIST_GROWTH_REBUILD * old_lists:
        return (
            f"{key} has {old_lists} lists; the grown table wants {new_lists} ({fresh.key}), "
            "so its lists are too long to probe quickly"
        )
    return None


def index_bytes_estimate(key: str, n: int, dim: int) -> float:
    """Rough RAM of ``key`` over ``n`` rows (for ranking escalation candidates by budget)."""
    if key == "Flat":
        return n * dim * 4
    if key.startswith("HNSW"):
        links = re.match(r"HNSW(\d+)", key)
        if links is None:
            raise ValueError(f"index key {key!r} gives no HNSW link count")
        m = int(links.group(1))
        return n * (dim * 4 + 2 * m * 4 + 8)
    if family(key) == "refine":
        nlist = ivf_nlist(key) or nb_lists(n)
        return n * (4 * dim + dim // 4 + 8) + nlist * dim * 4
    return n * (dim // 4 + 8)


def stronger_keys(key: str, n: int, dim: int, memory_budget_gb: float) -> list[tuple[str, str]]:
    """Keys to try, in order, when ``key`` cannot reach the recall target: ``(key, why)``.

    A quantized key first gains an exact re-rank (the PQ codes' error is what caps recall on
    queries whose neighbours are all at similar, low cosine: text against images); an IVF
    whose probes are too slow for the latency budget gets a graph (HNSW32, fast single queries
    at high recall); exact search reaches any target. Only keys within the budget are offered.
    """
    budget = memory_budget_gb * 2**30
    refine, _ = _full_vectors_key(n, dim)
    ladder = [
        (refine, "an IVF shortlist re-ranked on the exact float32 vectors"),
        ("HNSW32", "a graph index (HNSW32): high recall at few distance computations"),
        ("Flat", "exact search: recall 1 whatever the queries"),
    ]
    if family(key) == "refine":
        ladder = ladder[1:]
    seen = {key}
    out = []
    for candidate, why in ladder:
        if candidate in seen or index_bytes_estimate(candidate, n, dim) > budget:
            continue
        seen.add(candidate)
        out.append((candidate, why))
    return out
