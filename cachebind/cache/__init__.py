"""Retrieval (eq. 3) and blend (eq. 4): F_M -> F~_M with its neighbours."""

from cachebind.cache.model import (
    CacheModel,
    Enhanced,
    FaissNeighbours,
    NeighbourIndex,
    VectorSource,
    blend,
    mix,
    normalize,
    softmax_weights,
    validate_params,
)

__all__ = [
    "CacheModel",
    "Enhanced",
    "FaissNeighbours",
    "NeighbourIndex",
    "VectorSource",
    "blend",
    "mix",
    "normalize",
    "softmax_weights",
    "validate_params",
]
