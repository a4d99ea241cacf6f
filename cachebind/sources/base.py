"""The reader's data model: a source is split into partitions (shards), a partition yields samples.

The partition is the unit of work and of resumption (as in clip-retrieval's reader -> mapper ->
writer -> runner): its ``id`` is stable across runs for the same inputs, so a job that was killed
can tell which shards it already finished. A sample's ``key`` is unique in the whole collection;
the table's row id is ``row_id(key)``, which makes every write idempotent.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from cachebind.storage import StorageOptions

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""File extensions read as images (lower case, no dot), in order of preference."""
UNSUPPORTED_IMAGE_EXTENSIONS = ("svg", "svgz", "heic", "heif", "avif", "jxl", "eps", "psd", "raw")
"""Images that are not decoded (vector formats, codecs Pillow lacks): a sample made of one is
recorded as ``unsupported_format`` instead of vanishing."""


@dataclass(frozen=True)
class Partition:
    """One shard of a source: a tar file, a parquet row group, a folder chunk, TSV rows.

    ``kind`` names the reader, ``uri`` the file (local path or fsspec URI) and ``options`` the
    reader's parameters (JSON-compatible, so that a partition travels to Ray workers and into the
    progress table as plain data).
    """

    kind: str
    id: str
    uri: str
    options: dict[str, Any] = field(default_factory=dict)
    stamp: str = ""
    """The file as it was listed: size and modification time (ETag on S3); empty for a folder,
    whose chunk's file list is in ``options``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """A digest of what the partition covers (reader, file and its stamp, options such as a
        folder chunk's file list): a finished partition is skipped on resume only while this
        still matches, so a shard file replaced since is read again (rows already in the table
        are skipped by id)."""
        text = json.dumps(
            [self.kind, self.uri, self.options, self.stamp], sort_keys=True, default=str
        )
        return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        return cls(
            kind=data["kind"],
            id=data["id"],
            uri=data["uri"],
            options=dict(data["options"]),
            stamp=data.get("stamp", ""),
        )


@dataclass
class Sample:
    """One image of a source, not yet decoded.

    ``image`` holds the encoded bytes; when the reader already knows the sample is unusable (a
    file listed in a TSV that was never downloaded, a tar member without an image), ``image`` is
    None and ``error`` is ``(reason, detail)`` so that the job can record it in the errors table.
    """

    key: str
    image: bytes | None
    caption: str | None = None
    url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None


def samples_error(key: str, reason: str, detail: str, **kwargs: Any) -> Sample:
    """A sample that the reader could not produce (it goes to the errors table)."""
    return Sample(key=key, image=None, error=(reason, detail), **kwargs)


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style braces: ``x/{00000..00009}.tar`` and ``x/{a,b}.tar``.

    Zero padding follows the width of the range's first bound, as in webdataset/braceexpand.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo, hi = range_match.groups()
        width = len(lo) if lo.startswith("0") else 0
        choices = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [expanded for c in choices for expanded in expand_braces(head + c + tail)]


def url_to_fs(
    uri: str, storage: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a local path or URI (``file://``, ``memory://``, ``s3://``)."""
    return (storage or StorageOptions()).url_to_fs(uri)


def open_uri(uri: str, storage: StorageOptions | None = None, mode: str = "rb") -> Any:
    """``fsspec.open`` with the store's options (a context manager yielding the file)."""
    return (storage or StorageOptions()).open(uri, mode)


def join_uri(base: str, name: str) -> str:
    """``base`` (a directory URI) joined with a relative ``name``, keeping the protocol."""
    if "://" in name or name.startswith("/"):
        return name
    return base.rstrip("/") + "/" + name


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path from ``fs.ls``/``fs.glob`` turned back into a URI another process can open."""
    return fs.unstrip_protocol(path) if not _is_local(fs) else path


def expand_uris(pattern: str, suffix: str, storage: StorageOptions | None = None) -> list[str]:
    """The files a source pattern names: brace patterns, globs, single files, or every
    ``*<suffix>`` file of a folder (sorted, so partitions come in a stable order)."""
    uris: list[str] = []
    for expanded in expand_braces(pattern):
        fs, path = url_to_fs(expanded, storage)
        if fs.isdir(path):
            uris += [full_uri(fs, p) for p in sorted(fs.glob(f"{path.rstrip('/')}/*{suffix}"))]
        elif any(c in path for c in "*?["):
            uris += [full_uri(fs, p) for p in sorted(fs.glob(path))]
        else:
            uris.append(expanded)
    return uris


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def split_ext(name: str) -> tuple[str, str]:
    """``a/b/0001.jpg`` -> (``a/b/0001``, ``jpg``): the webdataset key is everything before the
    first dot of the base name, the extension everything after it (lower-cased)."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def file_stamps(uris: list[str], storage: StorageOptions | None = None) -> dict[str, str]:
    """``{uri: "size:changed"}`` (``changed``: the ETag where the store has one, else the
    modification time; ``""`` for a folder).

    One listing per parent folder, not one request per file: 10,000 shards on S3 would
    otherwise cost 10,000 HEAD requests before the job starts.
    """
    stamps: dict[str, str] = {}
    by_parent: dict[str, list[str]] = {}
    for uri in dict.fromkeys(uris):
        by_parent.setdefault(uri.rstrip("/").rpartition("/")[0], []).append(uri)
    for parent, members in by_parent.items():
        fs, _ = url_to_fs(members[0], storage)
        paths = {uri: url_to_fs(uri, storage)[1] for uri in members}
        try:
            listed = {
                e["name"].rstrip("/"): e for e in fs.ls(url_to_fs(parent, storage)[1], detail=True)
            }
        except (OSError, ValueError):  # no listing right (or no parent): ask file by file
            listed = {}
        for uri, path in paths.items():
            info = listed.get(path.rstrip("/")) or fs.info(path)
            stamps[uri] = _stamp(info)
    return stamps


def _stamp(info: dict[str, Any]) -> str:
    if info.get("type") == "directory":
        return ""
    changed = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{changed}"


class TooLarge(Exception):
    """A file over the reader's byte budget (``embed.max_image_bytes``), refused unread."""


def read_bytes(
    uri: str, storage: StorageOptions | None = None, max_bytes: int | None = None
) -> bytes:
    """The bytes of ``uri``; with ``max_bytes``, at most that many, else TooLarge.

    A file's stated size is checked before anything is read (a 20 GB "image" must not reach
    the reader's memory), and the read itself is bounded too, since a size can be wrong.
    """
    with open_uri(uri, storage) as f:
        return read_within(f, max_bytes, uri)


def read_within(f: Any, max_bytes: int | None, name: str) -> bytes:
    """The rest of the open file ``f``, or TooLarge past ``max_bytes`` (None: no budget)."""
    if max_bytes is None:
        return f.read()
    size = getattr(f, "size", None)
    if isinstance(size, int) and size > max_bytes:
        raise TooLarge(f"{name} is {size:,} bytes, over the budget of {max_bytes:,}")
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"{name} holds more than the budget of {max_bytes:,} bytes")
    return data


def iter_limit(samples: Iterator[Sample], limit: int | None) -> Iterator[Sample]:
    for i, sample in enumerate(samples):
        if limit is not None and i >= limit:
            return
        yield sample
