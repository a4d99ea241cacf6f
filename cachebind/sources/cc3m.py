"""The CC3M TSV (``caption<TAB>url`` per line, no header) joined to a folder of downloaded images.

Two ways to find a row's image, chosen by ``join``:

- ``join="key"`` (default): the folder is img2dataset's ``files`` output for this TSV. Row ``n``
  (0-based) has img2dataset's key ``f"{n:0{shard_digits + sample_digits}d}"`` (shard ``n //
  samples_per_shard``, img2dataset's defaults: 10,000 samples per shard, 4 sample digits, 5 shard
  digits) and its image is ``<images>/<shard:05d>/<key>.jpg`` (or ``<images>/<key>.jpg`` in a flat
  folder; any image extension).
- ``join="mapping"``: ``mapping`` names a CSV/TSV (header ``url,path``) or parquet file (columns
  ``url`` and ``path``) mapping each URL to an image path relative to ``images``.

A row whose image is not in the folder (CC3M links rot; ~15% never download) is reported with
reason ``missing`` in the errors table. One partition per ``samples_per_shard`` rows; the
partition records the byte offset of its first row so that workers seek instead of re-reading.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import pyarrow.parquet as pq

from cachebind.sources.base import (
    IMAGE_EXTENSIONS,
    Partition,
    Refused,
    Sample,
    StorageOptions,
    open_uri,
    outside_option,
    read_bytes,
    read_inside,
    samples_error,
    url_to_fs,
)

KIND = "cc3m"
MAX_LINE_BYTES = 1024 * 1024
"""A TSV row longer than this is a ``too_large`` error, read in pieces and dropped."""


def img2dataset_key(row: int, samples_per_shard: int, sample_digits: int, shard_digits: int) -> str:
    """img2dataset's key of input row ``row``: shard id then position, zero padded."""
    shard, position = divmod(row, samples_per_shard)
    return f"{shard * 10**sample_digits + position:0{shard_digits + sample_digits}d}"


def list_partitions(
    tsv: str,
    storage: StorageOptions | None = None,
    *,
    images: str | None = None,
    join: str = "key",
    mapping: str | None = None,
    samples_per_shard: int = 10_000,
    sample_digits: int = 4,
    shard_digits: int = 5,
    allow_outside: str | None = None,
    **_: Any,
) -> list[Partition]:
    if not images:
        raise ValueError("a CC3M TSV source needs the images folder: cc3m:FILE.tsv?images=DIR")
    if join not in ("key", "mapping"):
        raise ValueError(f"join must be 'key' or 'mapping', not {join!r}")
    if join == "mapping" and not mapping:
        raise ValueError("join=mapping needs mapping=FILE (columns url, path)")
    if join == "mapping":
        _mapping(mapping, storage or StorageOptions())  # a mapping without its columns: say so now
    samples_per_shard = int(samples_per_shard)
    options: dict[str, Any] = {
        "images": images.rstrip("/"),
        "join": join,
        "mapping": mapping,
        "samples_per_shard": samples_per_shard,
        "sample_digits": int(sample_digits),
        "shard_digits": int(shard_digits),
        **outside_option(allow_outside),
    }
    # One pass over the file to find where every shard starts.
    offsets: list[tuple[int, int]] = []  # (first row, byte offset)
    with open_uri(tsv, storage) as raw:
        f, offset, rows, line_start = _Lines(raw), 0, 0, True
        # In pieces of at most MAX_LINE_BYTES: a file of one 5 GB "line" is not held whole.
        while piece := f.readline(MAX_LINE_BYTES):
            if line_start:
                if rows % samples_per_shard == 0:
                    offsets.append((rows, offset))
                rows += 1
            offset += len(piece)
            line_start = piece.endswith(b"\n")
    name = posixpath.basename(tsv)
    shard_width = int(shard_digits)
    return [
        Partition(
            kind=KIND,
            id=f"{name}#{first // samples_per_shard:0{shard_width}d}",
            uri=tsv,
            options={
                **options,
                "first_row": first,
                "offset": byte_offset,
                "num_samples": min(samples_per_shard, rows - first),
            },
        )
        for first, byte_offset in offsets
    ]


def read_partition(
    partition: Partition, storage: StorageOptions | None = None, max_bytes: int | None = None
) -> Iterator[Sample]:
    opts = partition.options
    sps = opts["samples_per_shard"]
    first = opts["first_row"]
    shard = first // sps
    lookup = (
        _shard_files(opts["images"], shard, opts["shard_digits"], storage or StorageOptions())
        if opts["join"] == "key"
        else _mapping(opts["mapping"], storage or StorageOptions())
    )
    anywhere = bool(opts.get("allow_outside"))
    with open_uri(partition.uri, storage) as f:
        f.seek(opts["offset"])
        yield from _rows(_Lines(f), opts, lookup, storage, max_bytes, anywhere)


class _Lines:
    """``readline(limit)`` over any binary file (the files of fsspec's S3 take no limit)."""

    def __init__(self, f: Any, chunk: int = 1 << 16) -> None:
        self.f, self.chunk, self.buffer = f, chunk, b""

    def readline(self, limit: int) -> bytes:
        while True:
            end = self.buffer.find(b"\n", 0, limit)
            if end >= 0 or len(self.buffer) >= limit:
                cut = end + 1 if end >= 0 else limit
                line, self.buffer = self.buffer[:cut], self.buffer[cut:]
                return line
            more = self.f.read(self.chunk)
            if not more:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += more


def _read_line(f: _Lines) -> bytes | int:
    """The next line (b"" at the end), or its length when it is over MAX_LINE_BYTES (the
    rest of it read and dropped)."""
    line = f.readline(MAX_LINE_BYTES + 1)
    if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
        return line
    length = len(line)
    while (piece := f.readline(MAX_LINE_BYTES)) and not piece.endswith(b"\n"):
        length += len(piece)
    return length + len(piece)


def _rows(
    f: _Lines,
    opts: dict[str, Any],
    lookup: dict[str, str],
    storage: StorageOptions | None,
    max_bytes: int | None,
    anywhere: bool,
) -> Iterator[Sample]:
    sps, first = opts["samples_per_shard"], opts["first_row"]
    for i in range(sps):
        raw = _read_line(f)
        if not raw:
            break
        row = first + i
        key = img2dataset_key(row, sps, opts["sample_digits"], opts["shard_digits"])
        if isinstance(raw, int):
            detail = f"row {row} is a line of {raw:,} bytes, over {MAX_LINE_BYTES:,}"
            yield samples_error(key, "too_large", detail, extra={"row": row})
            continue
        caption, _, raw_url = raw.decode("utf-8", "replace").rstrip("\r\n").partition("\t")
        url = raw_url.strip() or None
        name = lookup.get(key if opts["join"] == "key" else (url or ""))
        meta = {"row": row}
        if name is None:
            detail = f"row {row}: no downloaded image for {url}"
            yield samples_error(key, "missing", detail, caption=caption, url=url, extra=meta)
            continue
        try:
            data = read_inside(opts["images"], name, storage, max_bytes, anywhere=anywhere)
        except Refused as exc:
            yield samples_error(key, exc.reason, str(exc), caption=caption, url=url, extra=meta)
            continue
        except OSError as exc:
            yield samples_error(key, "missing", str(exc), caption=caption, url=url, extra=meta)
            continue
        yield Sample(key=key, image=data, caption=caption, url=url, extra=meta)


@lru_cache(maxsize=4)
def _shard_files(
    images: str, shard: int, shard_digits: int, storage: StorageOptions
) -> dict[str, str]:
    """key -> relative image path for one img2dataset shard (nested) or the whole flat folder."""
    fs, root = url_to_fs(images, storage)
    root = root.rstrip("/")
    nested = f"{root}/{shard:0{shard_digits}d}"
    folder = nested if fs.isdir(nested) else root
    found: dict[str, str] = {}
    for path in sorted(fs.ls(folder, detail=False)):
        base = posixpath.basename(path)
        stem, _, ext = base.rpartition(".")
        if ext.lower() in IMAGE_EXTENSIONS and stem not in found:
            found[stem] = posixpath.relpath(path, root)
    return found


@lru_cache(maxsize=2)
def _mapping(uri: str, storage: StorageOptions) -> dict[str, str]:
    """url -> image path from a CSV/TSV (header url,path) or a parquet file; ValueError when
    it has no such columns (checked when the source is listed, so the job does not start)."""
    if uri.endswith(".parquet"):
        with open_uri(uri, storage) as f:
            names = pq.ParquetFile(f).schema_arrow.names
            if not {"url", "path"} <= set(names):
                raise ValueError(f"mapping {uri} needs columns url and path, not {names}")
            f.seek(0)
            table = pq.read_table(f, columns=["url", "path"])
        return dict(zip(table["url"].to_pylist(), table["path"].to_pylist(), strict=True))
    text = read_bytes(uri, storage).decode("utf-8", "replace")
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    if not {"url", "path"} <= set(reader.fieldnames or ()):
        raise ValueError(f"mapping {uri} needs a header url,path, not {reader.fieldnames}")
    return {r["url"]: r["path"] for r in reader if r["url"] is not None and r["path"]}
