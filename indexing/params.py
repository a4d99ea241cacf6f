"""Search-time parameters of a FAISS index: what can be tuned and how to set it.

The tunables are ``nprobe`` (inverted lists visited, IVF), ``k_factor`` (shortlist size of the
exact re-rank, ``RFlat``), ``efSearch`` (HNSW) and the HNSW coarse quantizer's ``efSearch``,
which follows ``nprobe`` (it must return at least ``nprobe`` centroids).
"""

from __future__ import annotations

from typing import Any

import faiss

GPU_MAX_K = 2048
"""FAISS's GPU limit on k and nprobe (without cuVS)."""


def _refine(index: faiss.Index) -> Any | None:
    top = faiss.downcast_index(index)
    return top if isinstance(top, faiss.IndexRefine) else None


def _hnsw(index: faiss.Index) -> Any | None:
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    return top if isinstance(top, faiss.IndexHNSW) else None


def ivf_of(index: faiss.Index) -> Any | None:
    return faiss.try_extract_index_ivf(index)


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set ``params`` on ``index`` (the keys that do not apply to it are ignored)."""
    refine = _refine(index)
    if refine is not None and "k_factor" in params:
        refine.k_factor = float(params["k_factor"])
    ivf = ivf_of(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(2 * int(params["nprobe"]), 64)
    hnsw = _hnsw(index)
    if hnsw is not None and "efSearch" in params:
        hnsw.hnsw.efSearch = int(params["efSearch"])


def search_grid(
    index: faiss.Index, *, gpu: bool = False
) -> tuple[str | None, list[int], list[int]]:
    """(primary knob, its values ascending, k_factor values) for the tuner.

    The primary knob trades recall for time monotonically (nprobe or efSearch); ``k_factor``
    values are empty when the index has no exact re-rank.
    """
    kfs = [1, 2, 4, 8, 16, 32, 64, 128] if _refine(index) is not None else []
    ivf = ivf_of(index)
    if ivf is not None:
        top = min(ivf.nlist, GPU_MAX_K) if gpu else ivf.nlist
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v <= top]
        if not values or values[-1] < top <= 4096:
            values.append(top)
        return "nprobe", values, kfs
    if _hnsw(index) is not None:
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048], kfs
    return None, [], kfs
