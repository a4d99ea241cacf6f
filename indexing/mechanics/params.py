"""What the tuner may try on a FAISS index: the grid of search-time parameters.

How a setting is applied (on the index, or per call) is the reading side's
(:mod:`cachebind.published.params`): a served version applies what the tuner chose.
"""

from __future__ import annotations

import faiss

from cachebind.published.params import (
    GPU_MAX_K,
    CallParams,
    apply_search_params,
    hnsw_of,
    ivf_of,
    refine_of,
    strongest,
)

__all__ = ["CallParams", "apply_search_params", "search_grid", "strongest"]


def search_grid(
    index: faiss.Index, *, gpu: bool = False
) -> tuple[str | None, list[int], list[int]]:
    """(primary knob, its values ascending, k_factor values) for the tuner.

    The primary knob trades recall for time monotonically (nprobe or efSearch); ``k_factor``
    values are empty when the index has no exact re-rank.
    """
    kfs = [1, 2, 4, 8, 16, 32, 64, 128] if refine_of(index) is not None else []
    ivf = ivf_of(index)
    if ivf is not None:
        top = min(ivf.nlist, GPU_MAX_K) if gpu else ivf.nlist
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v <= top]
        if not values or values[-1] < top <= 4096:
            values.append(top)
        return "nprobe", values, kfs
    if hnsw_of(index) is not None:
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048], kfs
    return None, [], kfs
