"""The GPU path, kept small and guarded: used only when a GPU is present and allowed.

What is saved is always a CPU index (it loads on a CPU-only machine); it moves to the GPU at
load. Exact search stores the cache as fp16 on the GPU: one read of the matrix per query batch
(DESIGN.md §5: ~2 ms for 3.3M x 1024 on an H100). Without faiss-gpu (the default faiss-cpu
wheel), a torch matrix product + top-k does the same exact search; it also runs on the CPU,
which is how the tests cover it.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from indexing.faiss_ops import ondisk_invlists
from indexing.params import GPU_MAX_K

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

    Positions are returned (the caller maps them to table ids). Query batches are cut so the
    score matrix stays within ``max_scores`` elements.
    """

    def __init__(self, vectors: np.ndarray, device: str = "cuda", dtype: str = "float16") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.matrix = torch.from_numpy(np.ascontiguousarray(vectors)).to(self.device, self.dtype)
        self.ntotal = len(vectors)
        self.max_scores = 1 << 28

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        n = len(queries)
        kk = min(k, self.ntotal)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        positions = np.full((n, k), -1, dtype=np.int64)
        if kk == 0 or n == 0:
            return scores, positions
        step = max(1, self.max_scores // max(self.ntotal, 1))
        with torch.inference_mode():
            for s in range(0, n, step):
                q = torch.from_numpy(queries[s : s + step]).to(self.device, self.dtype)
                sims = q @ self.matrix.T
                top = torch.topk(sims.float(), kk, dim=1)
                scores[s : s + step, :kk] = top.values.cpu().numpy()
                positions[s : s + step, :kk] = top.indices.cpu().numpy()
        return scores, positions


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
