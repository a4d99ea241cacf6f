"""On-disk inverted lists: a sharded IVF build merged into one memory-mapped file.

This is FAISS's way to build and serve an IVF index larger than a machine's RAM
(``faiss.contrib.ondisk.merge_ondisk``; autofaiss's distributed build stores global ids the same
way). Each shard task fills a copy of the trained index with its rows, stored under their table
positions, and writes only its inverted lists (codes and ids, laid out as an ivfdata file: the
coarse quantizer and codebooks are the driver's already). The driver memory-maps these files and
concatenates them list by list, in shard order, into ``index.ivfdata``
(``OnDiskInvertedLists.merge_from_multiple``): codes go from page cache to page cache, so the
driver's own memory holds the trained index and the list offsets, never the codes.

A version built this way holds ``index.faiss`` (quantizer, codebooks, list offsets and the
ivfdata's file name, stored relative to the folder), ``index.ivfdata``, ``ids.npy`` and
``manifest.json``. A reader maps the ivfdata read-only and pages codes in as searches touch their
lists, so neither the build driver nor a server needs RAM for all the codes. Published versions
are never written again: :class:`CopyOnWriteAdd` grows one into a new version's own ivfdata.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cachebind.config import IndexConfig
from cachebind.published.faissio import ondisk_invlists, read_index
from cachebind.published.layout import INDEX_FILE
from indexing.mechanics.faiss_ops import new_index

log = logging.getLogger(__name__)

IVFDATA_FILE = "index.ivfdata"
SHARD_SUFFIX = ".ivfdata"


@dataclass(frozen=True)
class MergePlan:
    """How a build's shards are merged, and why (recorded in the manifest's ``storage``)."""

    on_disk: bool
    reason: str
    index_bytes: int
    """Estimated size of the merged index's per-row data (codes, ids, re-rank vectors)."""


def unsupported_reason(index: faiss.Index) -> str | None:
    """Why ``index``'s rows cannot live in an ``.ivfdata`` file, or None when they can."""
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        return (
            "an RFlat re-rank keeps a float32 copy of every vector in RAM (IndexRefineFlat has "
            "no on-disk form; only its IVF shortlist has inverted lists)"
        )
    if isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    if not isinstance(top, faiss.IndexIVF):
        return f"{type(top).__name__} has no inverted lists: it keeps every vector in RAM"
    if isinstance(top, faiss.IndexIVFFastScan):
        return (
            "fast-scan codes (x4fs) are packed 32 vectors to a block (BlockInvertedLists), "
            "which OnDiskInvertedLists cannot hold"
        )
    if isinstance(top, faiss.IndexIVFPQR):
        return "IVFPQR keeps its re-rank codes in RAM"
    if not isinstance(faiss.downcast_InvertedLists(top.invlists), faiss.ArrayInvertedLists):
        return f"its inverted lists are {type(top.invlists).__name__}, not one code per entry"
    return None


def index_bytes(index: faiss.Index, n: int) -> int:
    """The bytes ``n`` rows take in ``index`` (codes + ids, plus RFlat's float32 vectors)."""
    top = faiss.downcast_index(index)
    refine = 0
    if isinstance(top, faiss.IndexRefine):
        refine = n * faiss.downcast_index(top.refine_index).code_size
        top = faiss.downcast_index(top.base_index)
    ivf = faiss.try_extract_index_ivf(top)
    if ivf is not None:
        return refine + n * (int(ivf.code_size) + 8)
    return refine + n * int(getattr(top, "code_size", 4 * top.d))


def plan_merge(key: str, n: int, dim: int, config: IndexConfig, shards: int) -> MergePlan:
    """Decide, before training, whether the shards of ``key`` over ``n`` rows merge on disk.

    The in-memory merge holds every shard's serialised index and the merged one at its peak,
    about twice :func:`index_bytes`; ``auto`` goes on disk when that exceeds
    ``config.merge_memory_gb`` and the key has inverted lists that can live on disk.
    """
    probe = new_index(dim, key)  # untrained: cheap, and enough to know its layout
    size = index_bytes(probe, n)
    peak = 2 * size
    gib = peak / 2**30
    budget = config.merge_memory_gb
    if shards <= 1:
        return MergePlan(False, "single-process build: nothing to merge", size)
    if config.merge_on_disk == "no":
        return MergePlan(False, "merge_on_disk = 'no'", size)
    why_not = unsupported_reason(probe)
    if why_not is not None:
        if config.merge_on_disk == "yes":
            raise ValueError(
                f"merge_on_disk = 'yes', but {key} cannot be merged on disk: {why_not}. Force an "
                "IVF key with one code per vector (IVF…,PQ…x8, IVF…,SQ8, IVF…,Flat), or lower "
                "memory_budget_gb so that the selection compresses the vectors"
            )
        if peak > budget * 2**30:
            log.warning(
                "merging %s in memory (~%.1f GiB, over merge_memory_gb = %s): %s",
                key,
                gib,
                budget,
                why_not,
            )
        return MergePlan(False, f"in memory: {why_not}", size)
    if config.merge_on_disk == "yes":
        return MergePlan(True, "merge_on_disk = 'yes'", size)
    if peak > budget * 2**30:
        return MergePlan(
            True, f"an in-memory merge would take ~{gib:.1f} GiB > merge_memory_gb {budget}", size
        )
    return MergePlan(
        False, f"an in-memory merge (~{gib:.2f} GiB) fits merge_memory_gb {budget}", size
    )


class AddAtPositions:
    """Adds rows to an IVF index under their table positions (``add_with_ids``) from ``first``.

    The on-disk merge concatenates inverted lists without shifting ids: faiss 1.15.1's
    ``merge_from_multiple(shift_ids=True)`` offsets part i by the size of part i instead of
    parts 0..i-1, which is only right when every shard has the same size. So each part carries
    its global positions already (what autofaiss's distributed build does too).
    """

    def __init__(self, index: faiss.Index, first: int) -> None:
        self.index = index
        self.next = int(first)

    def add(self, x: np.ndarray) -> None:
        positions = np.arange(self.next, self.next + len(x), dtype=np.int64)
        self.index.add_with_ids(x, positions)
        self.next += len(x)


def _invlists(index: faiss.Index) -> Any:
    return faiss.extract_index_ivf(index).invlists


@dataclass(frozen=True)
class ShardLists:
    """A shard's inverted lists in a file laid out as an ivfdata: per list, codes then ids."""

    path: str
    sizes: np.ndarray
    """Entries per list (uint64): the file holds no header, the offsets follow from these."""
    nbytes: int


def write_shard(index: faiss.Index, path: Path) -> ShardLists:
    """Write ``index``'s inverted lists to ``path``, compact, in the ivfdata layout.

    Written under a temporary name and renamed, so a retried or killed task never leaves a
    half-written file under the name the driver reads. (FAISS's own ``write_InvertedLists``
    format would do too, but the lists ``read_InvertedLists`` returns cannot be freed from
    Python without corrupting SWIG's state in faiss 1.15.1; these files are opened by
    :func:`open_shard` with objects Python owns.)
    """
    path = Path(path)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    sizes = np.array([lists.list_size(j) for j in range(ivf.nlist)], dtype=np.uint64)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    target = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp))
    pointers = faiss.InvertedListsPtrVector()
    pointers.push_back(lists)
    with _c_stdout_to_stderr():
        target.merge_from_multiple(pointers.data(), 1, False)
    nbytes = int(target.totsize)
    del target  # unmaps the file
    os.replace(tmp, path)
    return ShardLists(str(path), sizes, nbytes)


def open_shard(shard: ShardLists, nlist: int, code_size: int) -> Any:
    """Memory-map a shard's lists read-only (nothing is loaded)."""
    actual = Path(shard.path).stat().st_size
    if actual != shard.nbytes:
        # A mapping shorter than its list offsets would kill the merge with SIGBUS.
        raise RuntimeError(
            f"shard file {shard.path} holds {actual} bytes, its task wrote {shard.nbytes}"
        )
    if len(shard.sizes) != nlist:
        raise RuntimeError(f"shard file {shard.path} has {len(shard.sizes)} lists, not {nlist}")
    lists = faiss.OnDiskInvertedLists(nlist, code_size, shard.path)
    lists.read_only = True
    lists.totsize = shard.nbytes
    sizes = np.ascontiguousarray(shard.sizes, dtype=np.uint64)
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    lists.prefetch_nthread = 0
    lists.do_mmap()
    return lists


@contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """FAISS prints "resizing <file> to <n> bytes" on C stdout while it sizes an ivfdata file;
    the Ray job and ``--json`` print the manifest on stdout, so that line goes to stderr."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _set_ntotal(index: faiss.Index, n: int) -> None:
    top = faiss.downcast_index(index)
    top.ntotal = n
    if isinstance(top, faiss.IndexPreTransform):
        faiss.downcast_index(top.index).ntotal = n
    faiss.extract_index_ivf(index).ntotal = n


def merge(index: faiss.Index, parts: Sequence[Any], ivfdata: Path) -> faiss.Index:
    """Fill the empty, trained ``index`` with ``parts`` concatenated into ``ivfdata``.

    ``parts`` are inverted lists of copies of ``index`` whose ids are table positions already
    (:class:`AddAtPositions`); within each list they follow in the order given, the order a
    single build adding the rows in sequence produces. Afterwards ``index`` reads its lists
    from ``ivfdata`` (mapped read-write until the version is published).
    """
    ivf = faiss.extract_index_ivf(index)
    if index.ntotal:
        raise ValueError(f"merge needs an empty trained index, this one holds {index.ntotal}")
    target = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    pointers = faiss.InvertedListsPtrVector()
    for part in parts:
        pointers.push_back(part)
    with _c_stdout_to_stderr():
        n = target.merge_from_multiple(pointers.data(), pointers.size(), False)
    ivf.replace_invlists(target, True)
    target.this.disown()  # the index owns (and will unmap) it now
    _set_ntotal(index, int(n))
    # The data pages were written through a shared mapping: make them durable before a version
    # that names this file can be published.
    fd = os.open(ivfdata, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return index


def write_index(index: faiss.Index, path: Path) -> None:
    """``faiss.write_index``, storing an on-disk index's ivfdata name relative to its folder.

    FAISS stores the name it was given, and the staging folder a version is written to is
    renamed into ``versions/`` (and an index directory may be moved), so only the bare name
    is kept; :func:`read_index` resolves it in the version's folder.
    """
    lists = ondisk_invlists(index)
    if lists is None:
        faiss.write_index(index, str(path))
        return
    data = Path(lists.filename)
    if data.resolve().parent != Path(path).resolve().parent:
        raise ValueError(f"{data} must be in the folder of {path} to belong to the version")
    full = lists.filename
    lists.filename = data.name
    try:
        faiss.write_index(index, str(path))
    finally:
        lists.filename = full


def storage_of(index: faiss.Index, folder: Path) -> dict[str, Any]:
    """The manifest's ``storage`` entry for ``index`` written into ``folder``."""
    lists = ondisk_invlists(index)
    if lists is None:
        return {"invlists": "memory"}
    name = Path(lists.filename).name
    return {
        "invlists": "ondisk",
        "ivfdata": name,
        "ivfdata_bytes": (Path(folder) / name).stat().st_size,
    }


def empty_copy(folder: Path) -> faiss.Index:
    """The trained index of an on-disk version with empty in-memory lists (no data read)."""
    index = faiss.read_index(
        str(Path(folder) / INDEX_FILE), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
    )
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    _set_ntotal(index, 0)
    return index


class CopyOnWriteAdd:
    """``indexing.add`` on an on-disk version, without writing the published version's files.

    Servers may have its ivfdata mapped, and a version is immutable once published, so the
    appended rows go to an in-memory copy of the trained index (``adder``, positions from
    ``first``); :meth:`merge` then writes parent lists + new lists into a new staging
    folder's ivfdata, the same merge a sharded build does. RAM: the new rows' codes only.
    """

    def __init__(self, folder: Path, storage: Mapping[str, Any], first: int):
        self.folder = Path(folder)
        self.parent = read_index(self.folder, storage)
        self.rows = empty_copy(self.folder)
        self.adder = AddAtPositions(self.rows, first)

    def merge(self, staged: Path) -> faiss.Index:
        """The grown on-disk index, its ivfdata merged into the new staging folder ``staged``
        (removed if the merge fails)."""
        try:
            index = merge(
                empty_copy(self.folder),
                [_invlists(self.parent), _invlists(self.rows)],
                staged / IVFDATA_FILE,
            )
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        finally:
            del self.parent, self.rows, self.adder  # unmap the parent, free the new codes
        return index
