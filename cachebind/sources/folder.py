"""A folder of images, searched recursively, with optional sidecar captions (``x.jpg`` + ``x.txt``)
and sidecar metadata (``x.json``, as img2dataset's ``files`` output writes it).

Partitions: the sorted list of images cut into chunks of ``chunk_size`` files, named by the
first file of the chunk's folder and the chunk number. The key of a sample is its path relative
to the folder without extension (``sub/x``); when several images share a stem (``x.jpg`` and
``x.png``) each of them keeps its extension (``sub/x.jpg``, ``sub/x.png``), so that none is
dropped as a duplicate of the other. Images in formats that are not decoded (``.svg`` …) are
listed too and become ``unsupported_format`` errors.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any

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
    listed = IMAGE_EXTENSIONS + UNSUPPORTED_IMAGE_EXTENSIONS
    files = sorted(p for p in fs.find(root) if _ext(p) in listed)
    relative = [posixpath.relpath(p, root) for p in files]
    stems = Counter(_stem(name) for name in relative)
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
        shared = [name for name in chunk if stems[_stem(name)] > 1]
        if shared:  # only then: an ordinary folder's partitions (and fingerprints) are unchanged
            options["keep_extension"] = shared
        partitions.append(
            Partition(kind=KIND, id=f"part-{i // chunk_size:05d}", uri=base, options=options)
        )
    return partitions


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(name) else ""


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def read_partition(
    partition: Partition, storage: StorageOptions | None = None, max_bytes: int | None = None
) -> Iterator[Sample]:
    fs, root = url_to_fs(partition.uri, storage)
    keep_extension = set(partition.options.get("keep_extension", ()))
    # A link in the folder may not lead out of it (to ~/.ssh, say), unless the operator says so.
    inside = None if partition.options.get("allow_outside") else partition.uri
    for name in partition.options["files"]:
        stem = _stem(name)
        key = name if name in keep_extension else stem
        stem_path = f"{root.rstrip('/')}/{stem}"
        try:
            caption = _sidecar_text(_sidecar(fs, stem_path + ".txt", storage, inside, max_bytes))
            meta = _sidecar_json(_sidecar(fs, stem_path + ".json", storage, inside, max_bytes))
        except Refused as exc:
            yield samples_error(key, exc.reason, f"sidecar: {exc}")
            continue
        url = meta.get("url")
        if _ext(name) in UNSUPPORTED_IMAGE_EXTENSIONS:
            detail = f"{name}: .{_ext(name)} images are not decoded"
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
