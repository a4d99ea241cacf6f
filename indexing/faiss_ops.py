"""Small FAISS helpers: create, (de)serialise and merge indexes built from the same trained one."""

from __future__ import annotations

import faiss
import numpy as np


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


def ondisk_invlists(index: faiss.Index) -> faiss.OnDiskInvertedLists | None:
    """The on-disk (memory-mapped ``.ivfdata``) inverted lists of an IVF ``index``, if any."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.invlists is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def has_exact_storage(index: faiss.Index) -> faiss.Index | None:
    """The flat float32 store inside ``index`` (Flat itself, or RFlat's re-rank store), if any.

    Vectors reconstructed from it are exact; PQ codes would be lossy and are never used.
    """
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        top = faiss.downcast_index(top.refine_index)
    if isinstance(top, faiss.IndexFlat):
        return top
    return None
