"""Fit (train) a FAISS index on a sample of vectors, and search it as the tuner does.

FAISS calls this "training"; it is named fitting here so it is never confused with training
the LLM (:mod:`cachebind.train`). Which rows form the sample is the build's choice
(:func:`indexing.steps.prepare.fit_on_sample`).
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np
from tqdm.auto import tqdm

KMEANS_ITERATIONS = 10


def fit_index(index: faiss.Index, key: str, sample: np.ndarray, progress: bool) -> None:
    """Train ``index`` (of factory ``key``) on ``sample`` in place."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # 10 k-means iterations instead of 25: the centroids only route the search (the
        # tuner picks nprobe on the result) and k-means is most of a CPU build's time.
        ivf.cp.niter = KMEANS_ITERATIONS
    with tqdm(total=1, desc=f"training {key}", disable=not progress, leave=False):
        index.train(sample)


def search_fn(index: faiss.Index) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(np.ascontiguousarray(q, dtype=np.float32), k)

    return search
