"""Load a published version for serving, refusing one built from another table."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from cachebind.arrays import Floats, Ints
from cachebind.errors import IndexMismatchError
from cachebind.published.faissio import has_exact_storage, read_index
from cachebind.published.gpu import TorchExactSearch, gpu_k_ok, gpu_wanted, to_gpu
from cachebind.published.layout import IDS_FILE, current_version, versions_dir
from cachebind.published.manifest import (
    Manifest,
    check_alignment,
    ids_checksum,
    read_manifest,
    search_params_for,
)
from cachebind.published.params import CallParams, apply_search_params
from cachebind.store import CacheTable

log = logging.getLogger(__name__)

CPU_MATMUL_MIN_BATCH = 2
"""From this batch size, exact (Flat) search on the CPU runs as one torch matrix product:
measured 5x faster than FAISS's blocked scan at batch 64 over 50k x 1024 (50 vs 245 ms), same
results; FAISS stays for single queries, where both are one memory-bound pass."""


class LoadedIndex:
    """A published version in memory: top-k search S_topk over the cache and exact F_value.

    Thread-safe for concurrent searches (FAISS CPU search only reads the index, and a query
    searched with its modality's own setting passes it per call, never through the index's
    shared state).
    """

    def __init__(
        self,
        index: faiss.Index,
        ids: Ints,
        manifest: Manifest,
        table: CacheTable,
        *,
        use_gpu: str = "no",
    ) -> None:
        self.index = index
        self.ids = ids
        self.manifest = manifest
        if manifest.version is None:
            raise ValueError("a loaded index is a published version: its manifest has none")
        self.version: str = manifest.version
        self.table = table
        self.dim: int = manifest.dim
        apply_search_params(index, manifest.search_params)
        self._exact = has_exact_storage(index)
        self._default_params = dict(manifest.search_params)
        self._call_params: dict[tuple[tuple[str, int], ...], CallParams] = {}
        self._sorter: Ints | None = None
        self._gpu = to_gpu(index, manifest.index_key) if gpu_wanted(use_gpu) else None
        if self._gpu is not None:
            apply_search_params(self._gpu, manifest.search_params)
        self._cpu_matmul = None
        flat = faiss.downcast_index(index)
        if self._gpu is None and isinstance(flat, faiss.IndexFlat) and flat.ntotal:
            # A view of FAISS's own float32 store: no second copy of the cache in memory.
            stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(-1, flat.d)
            self._cpu_matmul = TorchExactSearch(stored, device="cpu", dtype="float32")

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    def params_for(self, parts: Sequence[str | None] | None) -> dict[str, int]:
        """The search setting for a query of these modalities (see
        :func:`cachebind.published.manifest.search_params_for`)."""
        return search_params_for(self.manifest, parts)

    def search(
        self, queries: Floats, k: int, parts: Sequence[str | None] | None = None
    ) -> tuple[Floats, Ints]:
        """Top-``k`` by inner product (cosine on unit vectors).

        ``queries`` float32 [n, d] -> (scores float32 [n, k], table ids int64 [n, k]), best
        first; when the cache has fewer than ``k`` rows the tail is padded with id -1 and score
        -inf. ``parts``: the modalities of the query (all rows of the batch): searched with
        the setting tuned for them (a GPU copy always uses the version's global setting, which
        every trusted set reaches).
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be float32 [n, {self.dim}], got {tuple(q.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, self.ntotal)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        out = np.full((len(q), k), -1, dtype=np.int64)
        if kk == 0 or len(q) == 0:
            return scores, out
        if self._gpu is not None and gpu_k_ok(kk):
            top_scores, positions = self._gpu.search(q, kk)
        elif self._cpu_matmul is not None and len(q) >= CPU_MATMUL_MIN_BATCH:
            top_scores, positions = self._cpu_matmul.search(q, kk)
        else:
            call = self._call_for(self.params_for(parts))
            if call is None:
                top_scores, positions = self.index.search(q, kk)
            else:
                top_scores, positions = self.index.search(q, kk, params=call.faiss)
        found = positions >= 0
        out[:, :kk] = np.where(found, self.ids[np.clip(positions, 0, None)], -1)
        scores[:, :kk] = np.where(found, top_scores, -np.inf)
        return scores, out

    def _call_for(self, params: dict[str, int]) -> CallParams | None:
        """Per-call parameters for a setting other than the one set on the index (None: the
        index's own). Built once per setting; dict writes are atomic under the GIL."""
        if params == self._default_params:
            return None
        key = tuple(sorted(params.items()))
        call = self._call_params.get(key)
        if call is None:
            call = self._call_params[key] = CallParams(self.index, params)
        return call if call.faiss is not None else None

    def positions(self, ids: Ints | Sequence[int]) -> Ints:
        """Index positions of table ``ids``; KeyError names ids that are not in this version."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._sorter is None:
            self._sorter = np.argsort(self.ids, kind="stable")
        at = np.searchsorted(self.ids, ids, sorter=self._sorter)
        at = np.clip(at, 0, max(len(self.ids) - 1, 0))
        pos = self._sorter[at] if len(self.ids) else at
        bad = (self.ids[pos] != ids) if len(self.ids) else np.ones(len(ids), bool)
        if bad.any():
            raise KeyError(f"ids not in index {self.version}: {ids[bad][:10].tolist()}")
        return pos

    def vectors(self, ids: Ints | Sequence[int]) -> Floats:
        """The exact cached vectors F_value of ``ids`` (float32 [len(ids), d]).

        From the index's own float32 store when it has one (Flat, or RFlat's re-rank store),
        else from the table; never decoded from lossy PQ codes.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._exact is None:
            return self.table.vectors(ids.tolist())
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        exact: Floats = self._exact.reconstruct_batch(self.positions(ids))
        return exact


def load_version(
    index_dir: Path,
    version: str,
    table: CacheTable,
    *,
    use_gpu: str = "auto",
) -> LoadedIndex:
    """Load ``version``, after checking it was built from ``table`` (IndexMismatchError if not).

    The check runs before the (possibly large) index file is read. An on-disk version
    (``manifest.storage["invlists"] == "ondisk"``) maps its ``index.ivfdata`` read-only from
    the version's folder: its codes are paged in by searches, not loaded.
    """
    folder = versions_dir(index_dir) / version
    manifest = read_manifest(index_dir, version)
    check_alignment(manifest, table, table.ids())
    ids = np.load(folder / IDS_FILE)
    if ids_checksum(ids) != manifest.table.ids_sha256:
        raise IndexMismatchError(f"{folder / IDS_FILE} does not match its manifest (corrupt?)")
    index = read_index(folder, manifest.storage)
    if index.ntotal != len(ids):
        raise IndexMismatchError(f"{folder}: index holds {index.ntotal} rows, ids.npy {len(ids)}")
    return LoadedIndex(index, ids, manifest, table, use_gpu=use_gpu)


def load_current(index_dir: Path, table: CacheTable, *, use_gpu: str = "auto") -> LoadedIndex:
    """Load the CURRENT version for ``table`` (see :func:`load_version`)."""
    version = current_version(index_dir)
    if version is None:
        raise FileNotFoundError(f"no published index in {index_dir}: run `cachebind index`")
    return load_version(index_dir, version, table, use_gpu=use_gpu)
