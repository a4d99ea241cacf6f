"""The reader's data model: a source is split into partitions (shards), a partition yields samples.

The partition is the unit of work and of resumption (as in clip-retrieval's reader -> mapper ->
writer -> runner): its ``id`` is stable across runs for the same inputs, so a job that was killed
can tell which shards it already finished. A sample's ``key`` is unique in the whole collection;
the table's row id is ``row_id(key)``, which makes every write idempotent.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import fsspec

from cachebind import formats
from cachebind.storage import StorageOptions

IMAGE_EXTENSIONS = formats.image_extensions()
"""File extensions read as images (lower case, no dot), in order of preference: the format
table's (``cachebind.formats``), the same list the service decodes."""
UNSUPPORTED_IMAGE_EXTENSIONS = formats.unsupported_extensions()
"""Images that are not decoded (vector formats, documents, codecs without their plug-in): a
sample made of one is recorded as ``unsupported_format`` without being read."""


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
    non_samples: int = 0
    """Files of the partition that are, by design, no sample (a folder's caption and metadata
    sidecars): the job's report counts them, so that every file is accounted for. Not part of
    the fingerprint (it follows from the file list)."""

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
            non_samples=int(data.get("non_samples", 0)),
        )


@dataclass
class Sample:
    """One image of a source, not yet decoded.

    ``image`` holds the encoded bytes; when the reader already knows the sample is unusable (a
    file listed in a TSV that was never downloaded, a tar member without an image), ``image`` is
    None and ``error`` is ``(reason, detail)`` so that the job can record it in the errors table.
    """

    key: str
    image: bytes | bytearray | None
    caption: str | None = None
    url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None


MAX_CAPTION_CHARS = 16_384
"""Captions are cut here (the text encoder reads 77 tokens; a 100 MB TSV cell is no caption)."""


def clean_text(value: Any, limit: int | None = None) -> str | None:
    """A key, caption or url as the table can store it: a string of valid UTF-8 or None.

    Sources hold anything: numbers or lists in a caption column, a caption ``.json`` of 5, a
    file name that is not UTF-8 (a lone surrogate once decoded, which no UTF-8 writer takes).
    Numbers become their text, other types None, lone surrogates a ``\\udcff`` escape."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    elif isinstance(value, bool | int | float):
        value = str(value)
    elif not isinstance(value, str):
        return None
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value[:limit] if limit is not None else value


def clean_sample(sample: Sample) -> Sample:
    """``sample`` with its key, caption and url made storable (see ``clean_text``)."""
    key = clean_text(sample.key) or ""
    caption = clean_text(sample.caption, MAX_CAPTION_CHARS)
    url = clean_text(sample.url)
    if (key, caption, url) == (sample.key, sample.caption, sample.url):
        return sample
    return replace(sample, key=key, caption=caption, url=url)


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


def open_uri(
    uri: str, storage: StorageOptions | None = None, mode: str = "rb", *, inside: str | None = None
) -> Any:
    """``fsspec.open`` with the store's options (a context manager yielding the file).

    A local file is opened only if it is a regular file (NotAFile otherwise: opening a FIFO
    blocks the worker until somebody writes to it, a device streams without end) and, with
    ``inside`` (a folder), only if its real path, links followed, lies in that folder
    (OutsideSource otherwise).
    """
    fs, path = url_to_fs(uri, storage)
    if _is_local(fs) and mode == "rb":
        root = url_to_fs(inside, storage)[1] if inside is not None else None
        return _open_local_file(path, root)
    return (storage or StorageOptions()).open(uri, mode)


_LIFT = " (a source trusted to name files anywhere takes allow_outside=1)"


def _open_local_file(path: str, inside: str | None) -> Any:
    real = os.path.realpath(path)
    if inside is not None:
        root = os.path.realpath(inside)
        if os.path.commonpath([real, root]) != root:
            raise OutsideSource(f"{path} leads to {real}, outside {inside}{_LIFT}")
    # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting for a writer.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFile(f"{path} is a {_file_kind(mode)}, not a file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def join_uri(base: str, name: str) -> str:
    """``base`` (a directory URI) joined with a relative ``name``, keeping the protocol."""
    if "://" in name or name.startswith("/"):
        return name
    return base.rstrip("/") + "/" + name


def path_inside(base: str, name: str) -> str:
    """``name``, a path that a source's data holds (a parquet cell, a mapping row), joined to
    the folder ``base`` it must stay in: OutsideSource when it is absolute, names another store
    or climbs out with ``..``. Otherwise a downloaded parquet could copy any file the worker can
    read into the cache, and its thumbnail into every search result."""
    if "\0" in name:
        raise OutsideSource(f"{name!r} holds a NUL byte")
    if "://" in name or name.startswith("/") or re.match(r"[A-Za-z]:[/\\]", name):
        raise OutsideSource(f"{name!r} is not relative to {base}{_LIFT}")
    clean = posixpath.normpath(name)
    if clean == ".." or clean.startswith("../"):
        raise OutsideSource(f"{name!r} climbs out of {base}{_LIFT}")
    return base.rstrip("/") + "/" + clean


def outside_option(value: Any) -> dict[str, bool]:
    """The partition option of a source's ``allow_outside=1`` (none when unset, so that the
    partitions, and the fingerprints of jobs that never set it, stay as they were)."""
    flag = str(value).strip().lower() in ("1", "true", "yes", "on") if value is not None else False
    return {"allow_outside": True} if flag else {}


def read_inside(
    base: str,
    name: str,
    storage: StorageOptions | None,
    max_bytes: int | None,
    *,
    anywhere: bool = False,
) -> bytes:
    """The bytes of ``name`` under ``base`` (see ``path_inside``; a local link may not lead out
    either); ``anywhere`` lifts both checks for a source whose paths the operator trusts."""
    if anywhere:
        return read_bytes(join_uri(base, name), storage, max_bytes)
    return read_bytes(path_inside(base, name), storage, max_bytes, inside=base)


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


class Refused(OSError):
    """A file the reader will not read; ``reason`` names it in the errors table. An OSError,
    so that a reader's catch-all for files it cannot read holds these too."""

    reason = "refused"


class TooLarge(Refused):
    """A file over the reader's byte budget (``embed.max_image_bytes``, by default
    ``input.max_bytes``), refused unread."""

    reason = "too_large"


class NotAFile(Refused):
    """A folder, FIFO, device or socket where a source names a file."""

    reason = "not_a_file"


class OutsideSource(Refused):
    """A path that leads out of the source's folder (absolute, ``..``, a link elsewhere)."""

    reason = "outside_source"


def read_bytes(
    uri: str,
    storage: StorageOptions | None = None,
    max_bytes: int | None = None,
    *,
    inside: str | None = None,
) -> bytes:
    """The bytes of ``uri``; with ``max_bytes``, at most that many, else TooLarge.

    A file's stated size is checked before anything is read (a 20 GB "image" must not reach
    the reader's memory), and the read itself is bounded too, since a size can be wrong.
    ``inside``: see ``open_uri``.
    """
    with open_uri(uri, storage, inside=inside) as f:
        return read_within(f, max_bytes, uri)


def read_within(f: Any, max_bytes: int | None, name: str) -> bytes:
    """The rest of the open file ``f``, or TooLarge past ``max_bytes`` (None: no budget)."""
    if max_bytes is None:
        return f.read()
    size = getattr(f, "size", None)
    if size is None and hasattr(f, "fileno"):
        size = os.fstat(f.fileno()).st_size
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
