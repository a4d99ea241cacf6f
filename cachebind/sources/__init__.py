"""sources: readers that turn datasets into partitions (shards) of samples.

``parse_source("webdataset:/data/cc3m/{00000..00331}.tar")`` names a source;
``list_partitions(spec)`` cuts it into units of work with stable ids; ``read_partition(p)`` yields
its ``Sample``\\ s (key, image bytes, caption, url, extra). Spec grammar::

    [KIND:]URI[?option=value&option=value]

KIND is ``webdataset`` (tar shards, brace patterns), ``parquet`` (img2dataset parquet output or
any parquet of image bytes/paths; options ``image_column``, ``path_column``, ``caption_column``,
``url_column``, ``key_column``), ``folder`` (images with sidecar ``.txt`` captions; option
``chunk_size``) or ``cc3m`` (caption<TAB>url TSV; options ``images``, ``join``, ``mapping``, see
``cachebind.sources.cc3m``). Without KIND it is detected: ``.tar`` -> webdataset, ``.parquet``
-> parquet, ``.tsv`` -> cc3m, a folder of tars / parquets -> webdataset / parquet, any other
folder -> folder. Paths that the data names (parquet paths, mapping rows, a folder's links) stay
in the source's folder unless the spec says ``allow_outside=1`` (``base.path_inside``).
URIs are local paths or anything fsspec opens (``file://``, ``s3://`` …); the ``storage``
argument carries the object-store options (``StorageOptions.from_s3(store.s3)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl

from cachebind.sources import cc3m, folder, parquet, webdataset
from cachebind.sources.base import (
    Partition,
    Sample,
    clean_sample,
    expand_braces,
    file_stamps,
    url_to_fs,
)
from cachebind.storage import StorageOptions

KINDS = ("webdataset", "parquet", "folder", "cc3m")
ALIASES = {"wds": "webdataset", "tar": "webdataset", "dir": "folder", "tsv": "cc3m"}

_LISTERS: dict[str, Callable[..., list[Partition]]] = {
    "webdataset": lambda uri, storage, **opts: webdataset.list_partitions(uri, storage),
    "parquet": parquet.list_partitions,
    "folder": folder.list_partitions,
    "cc3m": cc3m.list_partitions,
}
_Reader = Callable[[Partition, StorageOptions | None, int | None, int | None], Iterator[Sample]]
_READERS: dict[str, _Reader] = {
    "webdataset": lambda p, storage, max_bytes, _: webdataset.read_partition(p, storage, max_bytes),
    "parquet": parquet.read_partition,
    "folder": lambda p, storage, max_bytes, _: folder.read_partition(p, storage, max_bytes),
    "cc3m": lambda p, storage, max_bytes, _: cc3m.read_partition(p, storage, max_bytes),
}


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source: reader kind, location and reader options."""

    kind: str
    uri: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{self.uri}" + (f"?{query}" if query else "")


def parse_source(spec: str, storage: StorageOptions | None = None) -> SourceSpec:
    """Parse ``[KIND:]URI[?opts]``, detecting KIND from the URI when it is left out."""
    uri, _, query = spec.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    head, sep, rest = uri.partition(":")
    kind = ALIASES.get(head, head) if sep and not rest.startswith("//") else None
    if kind is not None and kind not in KINDS:
        kind = None  # a scheme such as "s3:" or a drive letter, not a reader kind
    if kind is not None:
        uri = rest
    else:
        kind = _detect(uri, storage)
    return SourceSpec(kind=kind, uri=uri, options=options)


def _detect(uri: str, storage: StorageOptions | None) -> str:
    first = expand_braces(uri)[0]
    lowered = first.lower()
    for suffix, kind in ((".tar", "webdataset"), (".parquet", "parquet"), (".tsv", "cc3m")):
        if lowered.endswith(suffix):
            return kind
    fs, path = url_to_fs(first, storage)
    if not fs.isdir(path):
        raise ValueError(
            f"cannot tell the kind of source {uri!r}: name it, e.g. webdataset:{uri}, "
            f"parquet:{uri}, folder:{uri} or cc3m:{uri}?images=DIR"
        )
    root = path.rstrip("/")
    if fs.glob(root + "/*.tar"):
        return "webdataset"
    if fs.glob(root + "/*.parquet"):
        return "parquet"
    return "folder"


def list_partitions(
    spec: SourceSpec | str, storage: StorageOptions | None = None
) -> list[Partition]:
    """The source's partitions in a stable order (ids unique within the source)."""
    if isinstance(spec, str):
        spec = parse_source(spec, storage)
    partitions = _LISTERS[spec.kind](spec.uri, storage, **spec.options)
    ids = [p.id for p in partitions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"source {spec} has partitions with the same name; rename the files")
    stamps = file_stamps([p.uri for p in partitions], storage)
    return [replace(p, stamp=stamps[p.uri]) for p in partitions]


def read_partition(
    partition: Partition,
    storage: StorageOptions | None = None,
    max_bytes: int | None = None,
    *,
    max_group_bytes: int | None = None,
) -> Iterator[Sample]:
    """The samples of one partition, in storage order.

    ``max_bytes``: a file (or tar member) over it is not read; its sample is a ``too_large``
    error. Without it every file is read whole. ``max_group_bytes``: the same for a parquet
    row group (uncompressed, by the file's metadata), whose rows all become ``too_large``.
    Keys, captions and urls come out as valid UTF-8 strings or None (``base.clean_sample``).
    """
    samples = _READERS[partition.kind](partition, storage, max_bytes, max_group_bytes)
    return (clean_sample(s) for s in samples)


__all__ = [
    "KINDS",
    "Partition",
    "Sample",
    "SourceSpec",
    "StorageOptions",
    "list_partitions",
    "parse_source",
    "read_partition",
]
