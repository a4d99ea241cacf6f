"""Small FAISS helpers: create, (de)serialise and merge indexes built from the same trained one."""

from __future__ import annotations

import faiss
import numpy as np

from cachebind.published.faissio import has_exact_storage, ondisk_invlists

__all__ = [
    "from_bytes",
    "has_exact_storage",
    "merge_into",
    "new_index",
    "ondisk_invlists",
    "to_bytes",
]


def new_index(dim: int, key: str) -> faiss.Index:
    """An empty index for ``key`` with the inner-product metric (cosine on unit vectors)."""
    return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)


def to_bytes(index: faiss.Index) -> np.ndarray:
    return faiss.serialize_index(index)


def from_bytes(data: np.ndarray) -> faiss.Index:
    return faiss.deserialize_index(np.asarray(data, dtype=np.uint8))


def merge_into(dst: faiss.Index, src: faiss.Index) -> None:
    """Append ``src``'s vectors after ``dst``'s (labels of ``src`` shifted by ``dst.ntotal``).

    Both must come from the same trained index (same centroids and codebooks). IVF indexes merge
    their inverted lists; a flat re-rank store and flat indexes append their codes. Within each
    inverted list the order is "dst then src", the order a single build adding the rows in
    sequence produces, so a sharded build equals a single one.
    """
    offset = dst.ntotal
    expected = offset + src.ntotal  # merge_from empties src
    d = faiss.downcast_index(dst)
    s = faiss.downcast_index(src)
    if type(d) is not type(s):
        raise TypeError(f"cannot merge {type(s).__name__} into {type(d).__name__}")
    if isinstance(d, faiss.IndexRefine):
        merge_into(d.base_index, s.base_index)
        merge_into(d.refine_index, s.refine_index)
        d.ntotal = expected
    elif isinstance(d, faiss.IndexPreTransform):
        merge_into(d.index, s.index)
        d.ntotal = expected
    elif isinstance(d, faiss.IndexIVF):
        d.merge_from(s, offset)
    elif isinstance(d, faiss.IndexFlatCodes):
        d.merge_from(s, 0)  # flat storage: labels are positions, appended in order
    else:
        raise NotImplementedError(f"merging {type(d).__name__} indexes is not supported")
    if dst.ntotal != expected:
        raise RuntimeError(f"merge lost vectors: {dst.ntotal} != {expected}")
