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
    Partition,
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


def read_partition(partition: Partition, storage: StorageOptions | None = None) -> Iterator[Sample]:
    """Stream the tar once, grouping consecutive members that share a key into one sample.

    A tar cut short (an interrupted download) keeps the samples before the cut and reports the
    rest as one ``truncated`` error for the shard, rather than failing the whole job.
    """
    try:
        with open_uri(partition.uri, storage) as raw:
            tail = _TailReader(raw)
            with tarfile.open(fileobj=tail, mode="r|*") as tar:
                yield from _members(tar, partition, tail)
    except _Truncated as cut:
        yield samples_error(
            f"{partition.id}#{cut.key or 'start'}",
            "truncated",
            f"tar shard {partition.uri} ends after {cut.key!r} without its end marker",
        )
    except (tarfile.TarError, EOFError, OSError) as exc:
        yield samples_error(
            f"{partition.id}#unreadable",
            "truncated",
            f"tar shard {partition.uri} is unreadable: {exc}",
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

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.tail = (self.tail + data)[-1024:]
        return data

    def ended_cleanly(self) -> bool:
        self.read(1024)  # tarfile may stop right after the first zero block
        return len(self.tail) == 1024 and not self.tail.strip(b"\0")


def _members(tar: tarfile.TarFile, partition: Partition, tail: _TailReader) -> Iterator[Sample]:
    current_key: str | None = None
    members: dict[str, bytes] = {}
    try:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_ext(member.name)
            if key.startswith("__") or not ext:  # webdataset's __index__ and the like
                continue
            if key != current_key and current_key is not None:
                yield _sample(current_key, members, partition)
                members = {}
            current_key = key
            handle = tar.extractfile(member)
            members[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        # A cut inside a member: the pending sample is incomplete, report it with the cut.
        raise _Truncated(current_key) from exc
    if not tail.ended_cleanly():
        raise _Truncated(current_key)  # the pending sample may have lost members
    if current_key is not None:
        yield _sample(current_key, members, partition)


def _sample(key: str, members: dict[str, bytes], partition: Partition) -> Sample:
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError):
            meta = {}
    # img2dataset keys are unique across shards; the member's base name is that key.
    sample_key = str(meta.get("key") or posixpath.basename(key))
    caption = members["txt"].decode("utf-8", "replace") if "txt" in members else meta.get("caption")
    url = meta.get("url")
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        return samples_error(
            sample_key,
            "empty",
            f"no image member for {key!r} in {partition.uri} (members: {sorted(members)})",
            caption=caption,
            url=url,
            extra=meta,
        )
    return Sample(key=sample_key, image=members[image_ext], caption=caption, url=url, extra=meta)
