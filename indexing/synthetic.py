"""Clustered synthetic embeddings that behave like real ones for nearest-neighbour search.

Real ImageBind features are not isotropic noise: they sit near a few thousand "concepts" and vary
along a low-dimensional set of directions. Pure Gaussian vectors in 1024-d make every neighbour
nearly equidistant (so no index can do better than exact search); these vectors have a real
neighbourhood structure, so recall and speed measured on them mean something.
"""

from __future__ import annotations

import numpy as np


def clustered_vectors(
    n: int,
    dim: int,
    *,
    seed: int = 0,
    n_clusters: int | None = None,
    latent_dim: int = 32,
    spread: float = 1.35,
    noise: float = 0.3,
    chunk: int = 65_536,
) -> np.ndarray:
    """``n`` L2-normalised float32 vectors in ``dim`` dimensions.

    Each vector is ``center_c + spread * z @ B + noise * eps`` (unit-norm centre, latent and
    residual terms of expected norm 1, ``spread`` and ``noise``): a cluster centre, a position in a
    shared ``latent_dim``-dimensional subspace ``B`` (what makes neighbours meaningful) and an
    isotropic residual, then normalised (the cache stores unit vectors; inner product = cosine).
    The defaults put the clusters just into overlap: at 100k rows the nearest neighbour has cosine
    ~0.66, and an IVF needs ~1% of its lists for recall@10 = 0.95 but ~10% for 0.97 -- a long tail,
    like real embeddings. (Separated clusters make any IVF look perfect; a pure 32-d Gaussian makes
    every index look bad.) The same ``seed`` always gives the same vectors, whatever ``chunk`` is.
    """
    if n_clusters is None:
        n_clusters = max(4, int(np.sqrt(n)))
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    basis = rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.sqrt(dim)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # One generator per chunk, seeded from (seed, chunk index): reproducible and chunk-local.
        crng = np.random.default_rng([seed, start // chunk])
        m = stop - start
        x = centers[crng.integers(0, n_clusters, m)]
        z = crng.standard_normal((m, latent_dim), dtype=np.float32) / np.sqrt(latent_dim)
        x += spread * (z @ basis)
        x += (noise / np.sqrt(dim)) * crng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
    return out
