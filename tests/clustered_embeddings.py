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


def modality_direction(images: np.ndarray, modality: str, *, space_seed: int = 0) -> np.ndarray:
    """The unit direction a modality's embeddings are offset along (its "cone": the modality
    gap of Liang et al. 2022), the same for tuning and evaluation queries.

    A random direction within the quarter of the space where the images vary least: the gap
    separates the modalities' cones without re-ranking the images (a direction the images vary
    along would make every text query's neighbours the images that happen to point its way).
    """
    sample = images[:: max(1, len(images) // 20_000)].astype(np.float64)
    _, vecs = np.linalg.eigh(sample.T @ sample)  # ascending eigenvalues
    low = vecs[:, : max(1, images.shape[1] // 4)]
    r = np.random.default_rng([space_seed, *modality.encode()]).standard_normal(low.shape[1])
    g = (low @ r).astype(np.float32)
    return g / np.linalg.norm(g)


def crossmodal_queries(
    images: np.ndarray,
    n: int,
    modality: str = "text",
    *,
    seed: int,
    space_seed: int = 0,
    cosine: float = 0.3,
    gap: float = 0.6,
    tied: np.ndarray | None = None,
    direction: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` queries of ``modality`` across the modality gap, and the image each is tied to.

    Query i is ``cosine * x_t + sqrt(1 - cosine^2) * u`` for a random image ``x_t`` of ``images``
    and a unit ``u`` orthogonal to it, made of the modality's direction (weight ``gap``) and an
    isotropic residual: so cos(query, its image) is exactly ``cosine`` (~0.3, like a caption
    and its image in ImageBind), all queries of a modality share a common offset (they sit in
    their own cone, far from the images' distribution), and the true neighbours are the tied
    image and its neighbourhood at low, close cosines. An index tuned on image queries probes
    too few lists for them. ``seed`` picks the images and residuals (use different seeds for
    tuning and for held-out evaluation); ``space_seed`` fixes the modality direction.
    ``tied``: the images to tie the queries to (e.g. each row its own caption) instead of
    random ones; ``direction``: the modality direction, when already computed (a large cache
    made in chunks must use one direction for all of them).
    """
    rng = np.random.default_rng([seed, *modality.encode()])
    dim = images.shape[1]
    if tied is None:
        tied = rng.integers(0, len(images), n)
    tied = np.asarray(tied, dtype=np.int64)
    n = len(tied)
    x = images[tied].astype(np.float32)
    g = (
        direction
        if direction is not None
        else modality_direction(images, modality, space_seed=space_seed)
    )
    eps = rng.standard_normal((n, dim), dtype=np.float32)
    eps /= np.linalg.norm(eps, axis=1, keepdims=True)
    u = gap * g[None, :] + np.sqrt(1.0 - gap**2) * eps
    u -= (u * x).sum(1, keepdims=True) * x  # orthogonal to the tied image
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    q = cosine * x + np.sqrt(1.0 - cosine**2) * u
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return np.ascontiguousarray(q, dtype=np.float32), tied.astype(np.int64)
