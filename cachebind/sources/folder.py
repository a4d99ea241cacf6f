"""A folder of images, searched recursively, with optional sidecar captions (``x.jpg`` + ``x.txt``)
and sidecar metadata (``x.json``, as img2dataset's ``files`` output writes it).

Every file of the folder is accounted for (docs/formats.md): a ``.txt`` or ``.json`` file is a
sidecar (no sample; partitions carry their count for the job's report); a file whose extension
names a format that is never decoded (``.svg``, ``.pdf`` …, ``formats.unsupported_extensions``)
is an ``unsupported_format`` error unread; every other file is a sample whose bytes the decoder
judges (an image of the format table, or ``unsupported_format`` / ``undecodable`` by its
bytes), as the service judges the same bytes.

Partitions: the sorted list of sample files cut into chunks of ``chunk_size`` files, named by
the chunk number. The key of an image (a file with an image extension, supported or not) is its
path relative to the folder without extension (``sub/x``); when several images share a stem
(``x.jpg`` and ``x.png``) each of them keeps its extension (``sub/x.jpg``, ``sub/x.png``), so
that none is dropped as a duplicate of the other. Any other file keeps its whole name as its
key (``notes.xml``), so that it never takes an image's key.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from cachebind.formats import SIDECAR_EXTENSIONS, unsupported_detail
from cachebind.sources.base import (
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    Partition,
    Refused,
    Sample,
    StorageOptions,
    full_uri,
    open_uri,
    outside_option,
    read_bytes,
    read_within,
    samples_error,
    url_to_fs,
)

KIND = "folder"
DEFAULT_CHUNK = 1000


def list_partitions(
    uri: str,
    storage: StorageOptions | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    allow_outside: str | None = None,
    **_: Any,
) -> list[Partition]:
    fs, root = url_to_fs(uri, storage)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"not a folder: {uri}")
    every = [posixpath.relpath(p, root) for p in sorted(fs.find(root))]
    relative = [name for name in every if _ext(name) not in SIDECAR_EXTENSIONS]
    sidecars = len(every) - len(relative)
    stems = Counter(_stem(name) for name in relative if _is_image_name(name))
    base = full_uri(fs, root)
    chunk_size = int(chunk_size)
    partitions = []
    for i in range(0, len(relative), chunk_size):
        chunk = relative[i : i + chunk_size]
        options: dict[str, Any] = {
            "files": chunk,
            "num_samples": len(chunk),
            **outside_option(allow_outside),
        }
        shared = [name for name in chunk if _is_image_name(name) and stems[_stem(name)] > 1]
        if shared:  # only then: an ordinary folder's partitions (and fingerprints) are unchanged
            options["keep_extension"] = shared
        partitions.append(
            Partition(kind=KIND, id=f"part-{i // chunk_size:05d}", uri=base, options=options)
        )
    if sidecars:
        # The count travels with a partition (the first, or an empty one for a folder of
        # sidecars only), so the report's total does not depend on how the folder was chunked.
        if not partitions:
            options = {"files": [], "num_samples": 0, **outside_option(allow_outside)}
            partitions.append(Partition(kind=KIND, id="part-00000", uri=base, options=options))
        partitions[0] = replace(partitions[0], non_samples=sidecars)
    return partitions


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(name) else ""


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_image_name(name: str) -> bool:
    return _ext(name) in IMAGE_EXTENSIONS or _ext(name) in UNSUPPORTED_IMAGE_EXTENSIONS


def _key(name: str, keep_extension: set[str]) -> str:
    if name in keep_extension or not _is_image_name(name):
        return name
    return _stem(name)


def read_partition(
    partition: Partition, storage: StorageOptions | None = None, max_bytes: int | None = None
) -> Iterator[Sample]:
    fs, root = url_to_fs(partition.uri, storage)
    keep_extension = set(partition.options.get("keep_extension", ()))
    # A link in the folder may not lead out of it (to ~/.ssh, say), unless the operator says so.
    inside = None if partition.options.get("allow_outside") else partition.uri
    for name in partition.options["files"]:
        stem = _stem(name)
        key = _key(name, keep_extension)
        stem_path = f"{root.rstrip('/')}/{stem}"
        try:
            caption = _sidecar_text(_sidecar(fs, stem_path + ".txt", storage, inside, max_bytes))
            meta = _sidecar_json(_sidecar(fs, stem_path + ".json", storage, inside, max_bytes))
        except Refused as exc:
            yield samples_error(key, exc.reason, f"sidecar: {exc}")
            continue
        url = meta.get("url")
        if _ext(name) in UNSUPPORTED_IMAGE_EXTENSIONS:
            detail = f"{name}: " + unsupported_detail(f".{_ext(name)}")
            yield samples_error(key, "unsupported_format", detail, caption=caption, url=url)
            continue
        try:
            uri = full_uri(fs, f"{root.rstrip('/')}/{name}")
            data = read_bytes(uri, storage, max_bytes, inside=inside)
        except Refused as exc:
            yield samples_error(key, exc.reason, str(exc), caption=caption, url=url)
            continue
        except OSError as exc:
            yield samples_error(key, "missing", f"cannot read {name}: {exc}", caption=caption)
            continue
        yield Sample(key=key, image=data, caption=caption, url=url, extra=meta)


def _sidecar(
    fs: Any, path: str, storage: StorageOptions | None, inside: str | None, max_bytes: int | None
) -> bytes | None:
    if not fs.exists(path):
        return None
    with open_uri(full_uri(fs, path), storage, inside=inside) as f:
        return read_within(f, max_bytes, path)


def _sidecar_text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "replace").strip()


def _sidecar_json(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}
