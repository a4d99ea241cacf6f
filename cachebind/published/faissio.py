"""Reading a version's FAISS files: its index, with on-disk inverted lists mapped read-only.

An on-disk version (``indexing.mechanics.ondisk`` builds one) holds ``index.faiss`` with the
ivfdata's bare file name and ``index.ivfdata`` beside it; a reader maps the ivfdata read-only
and pages codes in as searches touch their lists, shared by every process serving the version.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss

from cachebind.errors import IndexMismatchError
from cachebind.published.layout import INDEX_FILE, storage_files, version_files


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


def is_ondisk(manifest: Mapping[str, Any]) -> bool:
    """Whether a manifest's JSON object describes an on-disk version."""
    return bool(version_files(manifest))


def read_index(folder: Path, storage: Mapping[str, Any]) -> faiss.Index:
    """Read a version's index; an on-disk one (its manifest's ``storage`` says so) maps its
    ivfdata read-only from ``folder``."""
    folder = Path(folder)
    if not storage_files(storage):
        return faiss.read_index(str(folder / INDEX_FILE))
    name = storage["ivfdata"]
    if Path(name).name != name:
        raise IndexMismatchError(f"{folder}: ivfdata {name!r} must be a file in the version")
    data = folder / name
    try:
        size = data.stat().st_size
    except FileNotFoundError:
        raise IndexMismatchError(f"{folder}: {name} is missing (incomplete version?)") from None
    if size != int(storage["ivfdata_bytes"]):
        raise IndexMismatchError(
            f"{data} holds {size} bytes, its manifest says {storage['ivfdata_bytes']} (corrupt?)"
        )
    # SKIP_IVF_DATA: read the list offsets but map nothing yet (FAISS would map the stored
    # bare name relative to the working directory; IO_FLAG_ONDISK_SAME_DIR does what we do
    # here but prints to stdout on every load). READ_ONLY: map it PROT_READ, shared by every
    # process serving this version, and never written.
    index = faiss.read_index(
        str(folder / INDEX_FILE), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
    )
    lists = ondisk_invlists(index)
    if lists is None or int(lists.totsize) != size:
        raise IndexMismatchError(f"{folder / INDEX_FILE} does not describe {data}")
    lists.filename = str(data)
    # FAISS otherwise starts up to 32 threads per search to pre-read the probed lists; the
    # search's own threads page them in just as well from a warm page cache.
    lists.prefetch_nthread = 0
    lists.do_mmap()
    return index
