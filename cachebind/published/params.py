"""Search-time parameters of a FAISS index: how a published version's setting is applied.

The tunables are ``nprobe`` (inverted lists visited, IVF), ``k_factor`` (shortlist size of the
exact re-rank, ``RFlat``), ``efSearch`` (HNSW) and the HNSW coarse quantizer's ``efSearch``,
which follows ``nprobe`` (it must return at least ``nprobe`` centroids).
"""

from __future__ import annotations

from typing import Any

import faiss

GPU_MAX_K = 2048
"""FAISS's GPU limit on k and nprobe (without cuVS)."""


def refine_of(index: faiss.Index) -> Any | None:
    top = faiss.downcast_index(index)
    return top if isinstance(top, faiss.IndexRefine) else None


def hnsw_of(index: faiss.Index) -> Any | None:
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    return top if isinstance(top, faiss.IndexHNSW) else None


def ivf_of(index: faiss.Index) -> Any | None:
    return faiss.try_extract_index_ivf(index)


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set ``params`` on ``index`` (the keys that do not apply to it are ignored)."""
    refine = refine_of(index)
    if refine is not None and "k_factor" in params:
        refine.k_factor = float(params["k_factor"])
    ivf = ivf_of(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(2 * int(params["nprobe"]), 64)
    hnsw = hnsw_of(index)
    if hnsw is not None and "efSearch" in params:
        hnsw.hnsw.efSearch = int(params["efSearch"])


class CallParams:
    """FAISS per-call search parameters equal to :func:`apply_search_params` ``(index, params)``.

    Searches given these never touch the index's shared ``nprobe`` / ``k_factor`` / ``efSearch``,
    so concurrent searches with different settings (one per query modality) cannot race.
    ``faiss`` (the object to pass as ``params=``) is None for an index with no tunables.
    """

    def __init__(self, index: faiss.Index, params: dict[str, int]) -> None:
        self.params = dict(params)
        self._parts: list[Any] = []  # SWIG holds raw pointers: keep every nested object alive
        self.faiss = self._build(index)

    def _build(self, index: faiss.Index) -> Any | None:
        top = faiss.downcast_index(index)
        if isinstance(top, faiss.IndexRefine):
            out = faiss.IndexRefineSearchParameters()
            out.k_factor = float(self.params.get("k_factor", top.k_factor))
            base = self._build(top.base_index)
            if base is not None:
                out.base_index_params = base
            return self._keep(out)
        if isinstance(top, faiss.IndexPreTransform):
            inner = self._build(top.index)
            if inner is None:
                return None
            out = faiss.SearchParametersPreTransform()
            out.index_params = inner
            return self._keep(out)
        if isinstance(top, faiss.IndexHNSW):
            out = faiss.SearchParametersHNSW()
            out.efSearch = int(self.params.get("efSearch", top.hnsw.efSearch))
            return self._keep(out)
        if isinstance(top, faiss.IndexIVF):
            out = faiss.SearchParametersIVF()
            out.nprobe = int(self.params.get("nprobe", top.nprobe))
            quantizer = faiss.downcast_index(top.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                coarse = faiss.SearchParametersHNSW()
                coarse.efSearch = max(2 * out.nprobe, 64)
                out.quantizer_params = self._keep(coarse)
            return self._keep(out)
        return None

    def _keep(self, obj: Any) -> Any:
        self._parts.append(obj)
        return obj


def strongest(settings: list[dict[str, int]]) -> dict[str, int]:
    """Each knob at its largest value among ``settings``: recall grows with every knob, so this
    reaches what each of them reaches (a query mixing modalities gets the costliest part's)."""
    out: dict[str, int] = {}
    for params in settings:
        for key, value in params.items():
            out[key] = max(out.get(key, value), value)
    return out
