"""The GPU path, kept small and guarded: used only when a GPU is present and allowed.

What is saved is always a CPU index (it loads on a CPU-only machine); it moves to the GPU at
load. Exact search stores the cache as fp16 on the GPU: one read of the matrix per query batch
(docs/REFERENCE.md: ~2 ms for 3.3M x 1024 on an H100). Without faiss-gpu (the default faiss-cpu
wheel), a torch matrix product + top-k does the same exact search; it also runs on the CPU,
which is how the tests cover it.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from cachebind.arrays import Floats, Ints
from cachebind.published.faissio import ondisk_invlists
from cachebind.published.params import GPU_MAX_K

log = logging.getLogger(__name__)


def _torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA: no GPU for us
        return False


def gpu_wanted(use_gpu: str) -> bool:
    """``use_gpu``: ``auto`` (a GPU if present), ``yes`` (required), ``no``."""
    if use_gpu == "no":
        return False
    present = faiss.get_num_gpus() > 0 or _torch_cuda()
    if use_gpu == "yes" and not present:
        raise RuntimeError("IndexConfig.use_gpu = 'yes' but no GPU is visible")
    return present


def gpu_memory_bytes() -> int | None:
    if not _torch_cuda():
        return None
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


class TorchExactSearch:
    """Exact inner-product search as ``queries @ vectors.T`` + top-k, in fp16 on a GPU.

    Positions are returned (the caller maps them to table ids). The matrix is streamed in row
    chunks, each chunk's top-k merged into a running top-k, so a batch of queries reads the
    matrix once (the ~2 ms bandwidth floor of 3.3M x 1024 fp16 on an H100) while the score
    block stays within ``max_scores`` elements. Cutting the queries instead would read the
    whole matrix again for every query chunk: 13 times at batch 1024.
    """

    QUERY_BLOCK = 4096
    """Queries per pass over the matrix (bounds the running top-k and the score block)."""

    def __init__(self, vectors: Any, device: str = "cuda", dtype: str = "float16") -> None:
        """``vectors``: [n, d] as a numpy array or a torch tensor (already on the device, say)."""
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        matrix = vectors if isinstance(vectors, torch.Tensor) else torch.from_numpy(vectors)
        self.matrix = matrix.to(self.device, self.dtype).contiguous()
        self.ntotal = len(vectors)
        self.max_scores = 1 << 28

    def search(self, queries: Floats, k: int) -> tuple[Floats, Ints]:
        n = len(queries)
        kk = min(k, self.ntotal)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        positions = np.full((n, k), -1, dtype=np.int64)
        if kk == 0 or n == 0:
            return scores, positions
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self.torch.inference_mode():
            for s in range(0, n, self.QUERY_BLOCK):
                q = self.torch.from_numpy(queries[s : s + self.QUERY_BLOCK])
                values, indices = self._top_k(q.to(self.device, self.dtype), kk)
                scores[s : s + len(q), :kk] = values.float().cpu().numpy()
                positions[s : s + len(q), :kk] = indices.cpu().numpy()
        return scores, positions

    def _top_k(self, q: Any, k: int) -> tuple[Any, Any]:
        """The top-``k`` (values, row positions) of ``q @ matrix.T``, one pass over the rows."""
        torch = self.torch
        rows = max(k, self.max_scores // len(q))
        best_values = best_indices = None
        for start in range(0, self.ntotal, rows):
            sims = q @ self.matrix[start : start + rows].T
            values, indices = torch.topk(sims, min(k, sims.shape[1]), dim=1)
            indices += start
            if best_values is not None:
                values = torch.cat([best_values, values], dim=1)
                indices = torch.cat([best_indices, indices], dim=1)
                values, order = torch.topk(values, k, dim=1)
                indices = torch.gather(indices, 1, order)
            best_values, best_indices = values, indices
        return best_values, best_indices


def to_gpu(index: faiss.Index, key: str) -> Any | None:
    """A GPU searcher for a CPU ``index``, or None when this index cannot go to the GPU here.

    faiss-gpu: ``index_cpu_to_gpu`` with fp16 storage (Flat, IVF-Flat, IVF-PQ up to 96 bytes per
    code); fast-scan and re-rank indexes stay on the CPU. No faiss-gpu but CUDA torch: exact
    search for Flat only. An index with on-disk inverted lists stays on the CPU
    (:func:`gpu_refusal`).
    """
    refusal = gpu_refusal(index)
    if refusal is not None:
        log.warning("index %s stays on the CPU: %s", key, refusal)
        return None
    if faiss.get_num_gpus() > 0:
        try:
            options = faiss.GpuClonerOptions()
            options.useFloat16 = True
            resources = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(resources, 0, index, options)
            gpu_index.referenced_resources = resources  # keep alive with the index
            return gpu_index
        except RuntimeError as e:  # unsupported index type on the GPU: stay on the CPU
            log.warning("index %s stays on the CPU: %s", key, e)
            return None
    if key == "Flat" and _torch_cuda():
        flat = faiss.downcast_index(index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(-1, flat.d)
        return TorchExactSearch(vectors, "cuda")
    return None


def gpu_refusal(index: faiss.Index) -> str | None:
    """Why ``index`` is searched on the CPU even when a GPU is present (None: it may move).

    Its inverted lists are a memory-mapped file: a GPU copy would load every code into GPU
    memory (and first into RAM), which is what the on-disk layout exists to avoid; it was
    chosen because the codes exceed the memory the build was given.
    """
    if ondisk_invlists(index) is not None:
        return (
            "its inverted lists are on disk (memory-mapped index.ivfdata); a GPU copy would "
            "need all its codes in memory. Rebuild with merge_on_disk = 'no' to search it on a GPU"
        )
    return None


def gpu_k_ok(k: int) -> bool:
    return k <= GPU_MAX_K
