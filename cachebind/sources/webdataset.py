"""img2dataset webdataset shards: ``.tar`` files whose members ``<key>.jpg``, ``<key>.txt`` and
``<key>.json`` (url, width, height, key, status …) make up one sample each."""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self

from cachebind.formats import unsupported_detail
from cachebind.sources.base import (
    IMAGE_EXTENSIONS,
    MAX_CAPTION_CHARS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    Partition,
    Refused,
    Sample,
    StorageOptions,
    expand_uris,
    open_uri,
    samples_error,
    split_ext,
)

KIND = "webdataset"

MAX_HEADER_BYTES = 64 * 2**10
"""The largest GNU long-name/long-link or pax header read: tarfile holds one whole in memory, so
a header declaring 1.5 GB (a few MB of gzip) would otherwise take 1.5 GB before any check."""
MAX_JSON_BYTES = 2**20
"""The largest ``.json`` member read: its parsed dict travels with the sample as ``extra`` (and
is pickled into the decode sandbox), where a 60 MB one of 4M keys takes gigabytes."""
CAPTION_BYTES = 4 * MAX_CAPTION_CHARS
"""The bytes of a ``.txt`` caption read: captions are cut at ``MAX_CAPTION_CHARS`` anyway, and
no UTF-8 character takes more than 4 bytes, so the stored caption is the same as a whole read's."""
MAX_UNREAD_NAMES = 64
"""Unread members of one key remembered by name (for the detail of an ``empty`` sample and to
tell a repeated member name); one key may have a million of them."""

_IMAGES = frozenset(IMAGE_EXTENSIONS)
_READ = _IMAGES | {"txt", "json"}
"""The members a sample is made of: every other member is skipped unread (the stream skips its
blocks), including unsupported images, which only need to be known to exist."""


def list_partitions(pattern: str, storage: StorageOptions | None = None) -> list[Partition]:
    """One partition per tar: ``pattern`` is a brace pattern, a single tar, a glob or a folder."""
    uris = expand_uris(pattern, ".tar", storage)
    return [Partition(kind=KIND, id=posixpath.basename(u.rstrip("/")), uri=u) for u in uris]


def read_partition(
    partition: Partition, storage: StorageOptions | None = None, max_bytes: int | None = None
) -> Iterator[Sample]:
    """Stream the tar once, grouping consecutive members that share a key into one sample.

    A tar cut short (an interrupted download, plain or gzip-compressed) keeps the samples before
    the cut and reports the rest as one ``truncated`` error for the shard, rather than failing
    the whole job; a damaged header is one ``unreadable`` error for the rest, a long-name or pax
    header over ``MAX_HEADER_BYTES`` one ``too_large`` error (unread), a sparse member one
    ``unreadable`` error; a zero-byte shard is one ``empty_shard`` error.

    Only the members a sample uses are read (images, ``.txt``, ``.json``), and with
    ``max_bytes`` a sample whose members hold more than that together is ``too_large``. A
    ``.json`` over ``MAX_JSON_BYTES`` makes its sample ``too_large`` too (its metadata is not
    read); a ``.txt`` caption is read up to the caption limit only. Members named like
    webdataset's metadata (``__index__``, ``__key__.txt``) are skipped unless they are images.
    """
    counter: _CountingReader | None = None
    try:
        with open_uri(partition.uri, storage) as raw:
            counter = _CountingReader(raw)
            # typeshed asks every fileobj to write and seek; a read stream ("r|*") only reads.
            with _Shard.open(fileobj=counter, mode="r|*", tarinfo=_GuardedInfo) as tar:  # type: ignore[call-overload]
                yield from _samples(tar, partition, max_bytes)
    except _Stopped as stop:
        yield samples_error(f"{partition.id}#{stop.key or 'start'}", stop.reason, stop.detail)
    except _Refusal as exc:  # a bomb in the first member's headers
        yield samples_error(
            f"{partition.id}#start", exc.reason, f"tar shard {partition.uri}: {exc}"
        )
    except Refused as exc:  # a FIFO or a device named *.tar
        yield samples_error(f"{partition.id}#unreadable", exc.reason, f"tar shard {exc}")
    except (tarfile.TarError, EOFError, OSError, RecursionError) as exc:
        empty = counter is not None and counter.total == 0
        yield samples_error(
            f"{partition.id}#unreadable",
            "empty_shard" if empty else "truncated",
            f"tar shard {partition.uri} is empty (0 bytes)"
            if empty
            else f"tar shard {partition.uri} is unreadable: {exc!r}",
        )


class _CountingReader:
    """A file wrapper that counts the bytes read, to tell a zero-byte shard from a broken one."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        return data


class _Refusal(tarfile.TarError):
    """A header the reader will not process; the rest of the shard is not read. Not a
    HeaderError, so that tarfile passes it on as it is instead of ending the archive quietly."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Shard(tarfile.TarFile):
    """A TarFile that remembers why its last header could not be read: tarfile stops iterating
    silently both at the end-of-archive zero block and at a cut or damaged header."""

    header_error: tarfile.HeaderError | None = None
    members: list[tarfile.TarInfo]  # set by TarFile.__init__; typeshed leaves it out


class _GuardedInfo(tarfile.TarInfo):
    """Headers read with their sizes checked first, on the decompressed stream."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            if isinstance(tar, _Shard):
                tar.header_error = exc
            raise

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        kind = "long-name" if self.type == tarfile.GNUTYPE_LONGNAME else "long-link"
        self._check_header_size(f"a GNU {kind} header")
        return super()._proc_gnulong(tar)  # type: ignore[misc]

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_header_size("a pax header")
        return super()._proc_pax(tar)  # type: ignore[misc]

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        # Its chain of extension blocks has no bound; no image is ever stored sparse.
        raise _Refusal("unreadable", f"{self.name!r} is a GNU sparse member")

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tar: tarfile.TarFile) -> None:
        raise _Refusal("unreadable", f"{next.name!r} is a pax sparse member")

    def _check_header_size(self, what: str) -> None:
        if self.size > MAX_HEADER_BYTES:
            detail = f"{what} of {self.size:,} bytes, over the limit of {MAX_HEADER_BYTES:,}"
            raise _Refusal("too_large", detail)


class _Stopped(Exception):
    """The shard cannot be read past here: its rest, pending sample included, is one error."""

    def __init__(self, key: str | None, reason: str, detail: str) -> None:
        self.key, self.reason, self.detail = key, reason, detail


class _TooLarge:
    """A member over its budget: left unread."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


class _NotAFile:
    """A member that names a sample's file but holds no bytes: a symlink, a hard link, a device."""

    def __init__(self, member: tarfile.TarInfo) -> None:
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
        target = f" to {member.linkname!r}" if member.linkname else ""
        self.detail = f"{member.name!r} is a {kind}{target}, not a file"


class _Unread:
    """A member no sample needs (or an unsupported image, known by its name): skipped unread."""


_UNREAD = _Unread()
Member = bytes | _NotAFile | _TooLarge | _Unread


@dataclass
class _Pending:
    """The members read so far for one key, and the bytes they hold."""

    key: str
    members: dict[str, Member] = field(default_factory=dict)
    held: int = 0


def _samples(tar: _Shard, partition: Partition, max_bytes: int | None) -> Iterator[Sample]:
    pending: _Pending | None = None
    while True:
        try:
            member = tar.next()
        except _Refusal as exc:
            # Refused at a header: the members read so far are whole, so their sample stands.
            yield from _close(pending, partition)
            raise _Stopped(
                _key(pending), exc.reason, _stop_detail(partition, pending, exc)
            ) from exc
        except (tarfile.TarError, EOFError, OSError, RecursionError) as exc:
            # A cut inside a member: the pending sample is incomplete, report it with the cut.
            raise _Stopped(_key(pending), "truncated", _cut_detail(partition, pending)) from exc
        if member is None:
            break
        tar.members.clear()  # stream mode keeps every header otherwise: a million of them
        key, ext = split_ext(member.name)
        if member.isdir() or not ext or _is_metadata(key, ext):
            continue
        # A new key, or the same member name again (two samples that share a key), closes
        # the pending sample: nothing is overwritten unseen.
        if pending is not None and (key != pending.key or ext in pending.members):
            yield _sample(pending, partition)
            pending = None
        if pending is None:
            pending = _Pending(key)
        try:
            _add(pending, tar, member, ext, max_bytes)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise _Stopped(key, "truncated", _cut_detail(partition, pending)) from exc
    # typeshed leaves out tarfile's header-error subclasses.
    if isinstance(tar.header_error, tarfile.InvalidHeaderError):  # type: ignore[attr-defined]
        yield from _close(pending, partition)
        detail = f"tar shard {partition.uri} has a damaged header after {_key(pending)!r}"
        raise _Stopped(_key(pending), "unreadable", detail + "; the rest is not read")
    if not isinstance(tar.header_error, tarfile.EOFHeaderError):  # type: ignore[attr-defined]
        # No end-of-archive block: cut at a member boundary, maybe inside the pending sample.
        raise _Stopped(_key(pending), "truncated", _cut_detail(partition, pending))
    yield from _close(pending, partition)


def _close(pending: _Pending | None, partition: Partition) -> Iterator[Sample]:
    if pending is not None:
        yield _sample(pending, partition)


def _is_metadata(key: str, ext: str) -> bool:
    """webdataset's own metadata (``__key__``, ``__index__``): a base name wrapped in double
    underscores. An image named so is still a sample, so that it is never dropped unseen."""
    stem = posixpath.basename(key)
    return len(stem) > 4 and stem.startswith("__") and stem.endswith("__") and ext not in _IMAGES


def _add(
    pending: _Pending,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    ext: str,
    max_bytes: int | None,
) -> None:
    """Record ``member`` in the pending sample, reading it only if the sample uses it."""
    if not member.isfile():
        pending.members[ext] = _NotAFile(member)
    elif ext not in _READ:
        if ext in UNSUPPORTED_IMAGE_EXTENSIONS or len(pending.members) < MAX_UNREAD_NAMES:
            pending.members[ext] = _UNREAD
    elif max_bytes is not None and member.size > max_bytes:
        # Never read: the stream skips its blocks on the way to the next member.
        detail = f"{member.name!r} is {member.size:,} bytes, over the budget of {max_bytes:,}"
        pending.members[ext] = _TooLarge(detail)
    elif ext == "json" and member.size > MAX_JSON_BYTES:
        detail = f"{member.name!r} is {member.size:,} bytes, over the metadata limit of "
        pending.members[ext] = _TooLarge(detail + f"{MAX_JSON_BYTES:,}")
    else:
        size = min(member.size, CAPTION_BYTES) if ext == "txt" else member.size
        if max_bytes is not None and pending.held + size > max_bytes:
            detail = f"the members of {pending.key!r} hold more than the budget of {max_bytes:,}"
            pending.members[ext] = _TooLarge(detail + " bytes together")
            return
        handle = tar.extractfile(member)
        pending.members[ext] = handle.read(size) if handle is not None else b""
        pending.held += size


def _key(pending: _Pending | None) -> str | None:
    return pending.key if pending is not None else None


def _cut_detail(partition: Partition, pending: _Pending | None) -> str:
    return f"tar shard {partition.uri} ends after {_key(pending)!r} without its end marker"


def _stop_detail(partition: Partition, pending: _Pending | None, exc: _Refusal) -> str:
    return f"tar shard {partition.uri} has, after {_key(pending)!r}, {exc}; the rest is not read"


def sample_key(member_key: str, meta: dict[str, Any]) -> str:
    """The sample's key: img2dataset's ``key`` from the ``.json`` member when there is one, else
    the webdataset key (the member path without extension, so ``a/x.jpg`` and ``b/x.jpg`` are
    two samples). A flat tar's members (img2dataset's layout) have no folder part, so their keys
    are what earlier versions wrote and a resumed job on an older table finds them."""
    return str(meta.get("key") or posixpath.normpath(member_key).lstrip("/"))


def _metadata(members: dict[str, Member]) -> dict[str, Any]:
    """The ``.json`` member's dict; bad JSON, or JSON that is not an object, is ignored."""
    data = members.get("json")
    if not isinstance(data, bytes):
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _sample(pending: _Pending, partition: Partition) -> Sample:
    key, members = pending.key, pending.members
    meta = _metadata(members)
    name = sample_key(key, meta)
    text = members.get("txt")
    caption = text.decode("utf-8", "replace") if isinstance(text, bytes) else meta.get("caption")
    url = meta.get("url")
    common: dict[str, Any] = {"caption": caption, "url": url, "extra": meta}
    over = [m for m in members.values() if isinstance(m, _TooLarge)]
    if over:  # the image, or a caption or metadata member no sample needs gigabytes of
        return samples_error(name, "too_large", over[0].detail, **common)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is not None and isinstance(not_a_file := members[image_ext], _NotAFile):
        return samples_error(name, "not_a_file", not_a_file.detail, **common)
    if image_ext is None:
        other = next((e for e in UNSUPPORTED_IMAGE_EXTENSIONS if e in members), None)
        if other is not None:
            detail = f"{key}.{other} in {partition.uri}: " + unsupported_detail(f".{other}")
            return samples_error(name, "unsupported_format", detail, **common)
        links = [m for m in members.values() if isinstance(m, _NotAFile)]
        if links:
            return samples_error(name, "not_a_file", links[0].detail, **common)
        detail = f"no image member for {key!r} in {partition.uri} (members: {sorted(members)})"
        return samples_error(name, "empty", detail, **common)
    return Sample(key=name, image=bytes(members[image_ext]), **common)  # type: ignore[arg-type]
