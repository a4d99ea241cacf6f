"""img2dataset webdataset shards: ``.tar`` files whose members ``<key>.jpg``, ``<key>.txt`` and
``<key>.json`` (url, width, height, key, status …) make up one sample each."""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

from cachebind.sources.base import (
    IMAGE_EXTENSIONS,
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


def list_partitions(pattern: str, storage: StorageOptions | None = None) -> list[Partition]:
    """One partition per tar: ``pattern`` is a brace pattern, a single tar, a glob or a folder."""
    uris = expand_uris(pattern, ".tar", storage)
    return [Partition(kind=KIND, id=posixpath.basename(u.rstrip("/")), uri=u) for u in uris]


def read_partition(
    partition: Partition, storage: StorageOptions | None = None, max_bytes: int | None = None
) -> Iterator[Sample]:
    """Stream the tar once, grouping consecutive members that share a key into one sample.

    A tar cut short (an interrupted download) keeps the samples before the cut and reports the
    rest as one ``truncated`` error for the shard, rather than failing the whole job; a
    zero-byte shard is one ``empty_shard`` error.
    """
    tail: _TailReader | None = None
    try:
        with open_uri(partition.uri, storage) as raw:
            tail = _TailReader(raw)
            with tarfile.open(fileobj=tail, mode="r|*") as tar:
                yield from _members(tar, partition, tail, max_bytes)
    except _Truncated as cut:
        yield samples_error(
            f"{partition.id}#{cut.key or 'start'}",
            "truncated",
            f"tar shard {partition.uri} ends after {cut.key!r} without its end marker",
        )
    except Refused as exc:  # a FIFO or a device named *.tar
        yield samples_error(f"{partition.id}#unreadable", exc.reason, f"tar shard {exc}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        empty = tail is not None and tail.total == 0
        yield samples_error(
            f"{partition.id}#unreadable",
            "empty_shard" if empty else "truncated",
            f"tar shard {partition.uri} is empty (0 bytes)"
            if empty
            else f"tar shard {partition.uri} is unreadable: {exc}",
        )


class _Truncated(Exception):
    def __init__(self, key: str | None) -> None:
        self.key = key


class _TailReader:
    """A file wrapper that remembers the last bytes read: a complete tar ends with zero blocks
    (at least 1024 zero bytes), one cut at a member boundary does not, and tarfile's own
    iteration stops silently in both cases."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.tail = b""
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.tail = (self.tail + data)[-1024:]
            self.total += len(data)
        return data

    def ended_cleanly(self) -> bool:
        self.read(1024)  # tarfile may stop right after the first zero block
        return len(self.tail) == 1024 and not self.tail.strip(b"\0")


class _TooLarge:
    """A member whose header says it is over the byte budget: left unread."""

    def __init__(self, member: tarfile.TarInfo, max_bytes: int) -> None:
        self.detail = f"{member.name!r} is {member.size:,} bytes, over the budget of {max_bytes:,}"


class _NotAFile:
    """A member that names a sample's file but holds no bytes: a symlink, a hard link, a device."""

    def __init__(self, member: tarfile.TarInfo) -> None:
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
        target = f" to {member.linkname!r}" if member.linkname else ""
        self.detail = f"{member.name!r} is a {kind}{target}, not a file"


def _members(
    tar: tarfile.TarFile, partition: Partition, tail: _TailReader, max_bytes: int | None
) -> Iterator[Sample]:
    current_key: str | None = None
    members: dict[str, bytes | _NotAFile | _TooLarge] = {}
    try:
        for member in tar:
            if member.isdir():
                continue
            key, ext = split_ext(member.name)
            if posixpath.basename(key).startswith("__") or not ext:  # __index__ and the like
                continue
            # A new key, or the same member name again (two samples that share a key), closes
            # the pending sample: nothing is overwritten unseen.
            if current_key is not None and (key != current_key or ext in members):
                yield _sample(current_key, members, partition)
                members = {}
            current_key = key
            if member.isfile() and max_bytes is not None and member.size > max_bytes:
                # Never read: the stream skips its blocks on the way to the next member.
                members[ext] = _TooLarge(member, max_bytes)
            elif member.isfile():
                handle = tar.extractfile(member)
                members[ext] = handle.read() if handle is not None else b""
            else:
                members[ext] = _NotAFile(member)
    except (tarfile.TarError, EOFError, OSError) as exc:
        # A cut inside a member: the pending sample is incomplete, report it with the cut.
        raise _Truncated(current_key) from exc
    if not tail.ended_cleanly():
        raise _Truncated(current_key)  # the pending sample may have lost members
    if current_key is not None:
        yield _sample(current_key, members, partition)


def sample_key(member_key: str, meta: dict[str, Any]) -> str:
    """The sample's key: img2dataset's ``key`` from the ``.json`` member when there is one, else
    the webdataset key (the member path without extension, so ``a/x.jpg`` and ``b/x.jpg`` are
    two samples). A flat tar's members (img2dataset's layout) have no folder part, so their keys
    are what earlier versions wrote and a resumed job on an older table finds them."""
    return str(meta.get("key") or posixpath.normpath(member_key).lstrip("/"))


def _sample(
    key: str, members: dict[str, bytes | _NotAFile | _TooLarge], partition: Partition
) -> Sample:
    meta: dict[str, Any] = {}
    if isinstance(members.get("json"), bytes):
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError, RecursionError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
    name = sample_key(key, meta)
    text = members.get("txt")
    caption = text.decode("utf-8", "replace") if isinstance(text, bytes) else meta.get("caption")
    url = meta.get("url")
    common: dict[str, Any] = {"caption": caption, "url": url, "extra": meta}
    over = [m for m in members.values() if isinstance(m, _TooLarge)]
    if over:  # the image, or a caption or metadata member no sample needs gigabytes of
        return samples_error(name, "too_large", over[0].detail, **common)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is not None and isinstance(members[image_ext], _NotAFile):
        return samples_error(name, "not_a_file", members[image_ext].detail, **common)
    if image_ext is None:
        other = next((e for e in UNSUPPORTED_IMAGE_EXTENSIONS if e in members), None)
        if other is not None:
            detail = f"{key}.{other} in {partition.uri}: .{other} images are not decoded"
            return samples_error(name, "unsupported_format", detail, **common)
        links = [m for m in members.values() if isinstance(m, _NotAFile)]
        if links:
            return samples_error(name, "not_a_file", links[0].detail, **common)
        detail = f"no image member for {key!r} in {partition.uri} (members: {sorted(members)})"
        return samples_error(name, "empty", detail, **common)
    return Sample(key=name, image=bytes(members[image_ext]), **common)  # type: ignore[arg-type]
