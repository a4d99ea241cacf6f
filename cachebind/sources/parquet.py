"""Parquet sources: img2dataset's parquet output (image bytes in ``jpg``) and any parquet file of
image bytes or image paths with captions (column names configurable).

One partition per row group, so a 1 GB file of 10 row groups is ten units of work.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cachebind.sources.base import (
    Partition,
    Refused,
    Sample,
    StorageOptions,
    expand_uris,
    open_uri,
    outside_option,
    read_inside,
    samples_error,
)

KIND = "parquet"

IMAGE_COLUMNS = ("jpg", "image", "img", "image_bytes", "bytes", "png", "webp")
PATH_COLUMNS = ("path", "image_path", "filepath", "file", "filename")
CAPTION_COLUMNS = ("caption", "txt", "text", "TEXT")
URL_COLUMNS = ("url", "URL")
KEY_COLUMNS = ("key", "id")
META_COLUMNS = ("status", "error_message", "width", "height", "original_width", "sha256")


def list_partitions(
    pattern: str, storage: StorageOptions | None = None, **options: Any
) -> list[Partition]:
    """One partition per row group of every parquet file the pattern names.

    ``options``: ``image_column`` (bytes, or a struct with ``bytes``/``path`` as Hugging Face
    writes it), ``path_column`` (image paths, relative to the parquet file's folder),
    ``caption_column``, ``url_column``, ``key_column``; unset ones are detected by name.
    """
    uris = expand_uris(pattern, ".parquet", storage)
    partitions = []
    wrong_columns: list[str] = []
    for uri in uris:
        name = posixpath.basename(uri)
        try:
            columns, offsets = _row_groups(uri, storage, options)
        except _Unreadable as bad:
            # One bad file is one error row, not a job that cannot start.
            partitions.append(_unreadable(uri, name, bad.reason, bad.detail))
            if bad.reason == "wrong_columns":
                wrong_columns.append(bad.detail)
            continue
        n_groups = len(offsets) - 1
        for i in range(n_groups):
            partitions.append(
                Partition(
                    kind=KIND,
                    id=f"{name}#rg{i}",
                    uri=uri,
                    options={
                        **columns,
                        **outside_option(options.get("allow_outside")),
                        "row_group": i,
                        "first_row": offsets[i],
                        "num_samples": offsets[i + 1] - offsets[i],
                    },
                )
            )
    if wrong_columns and len(wrong_columns) == len(uris):
        # No file has the columns: a spec to fix (a misspelt column), not a collection of bad
        # files to record one by one.
        raise ValueError(wrong_columns[0])
    return partitions


class _Unreadable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def _row_groups(
    uri: str, storage: StorageOptions | None, options: dict[str, Any]
) -> tuple[dict[str, str | None], list[int]]:
    """The columns to read and the first row of every row group (plus the row count)."""
    try:
        with open_uri(uri, storage) as f:
            try:
                pfile = pq.ParquetFile(f)
            except (pa.ArrowException, OSError, ValueError) as exc:
                if f.seek(0, 2) == 0:
                    raise _Unreadable(
                        "empty_shard", f"parquet file {uri} is empty (0 bytes)"
                    ) from exc
                raise _Unreadable("unreadable", f"{uri}: {exc}") from exc
            try:
                columns = resolve_columns(pfile.schema_arrow.names, options)
            except ValueError as exc:
                raise _Unreadable("wrong_columns", f"{uri}: {exc}") from exc
            offsets = [0]
            for i in range(pfile.num_row_groups):
                offsets.append(offsets[-1] + pfile.metadata.row_group(i).num_rows)
    except Refused as exc:  # a FIFO or a device named *.parquet
        raise _Unreadable(exc.reason, str(exc)) from exc
    return columns, offsets


def _unreadable(uri: str, name: str, reason: str, detail: str) -> Partition:
    return Partition(
        kind=KIND,
        id=f"{name}#unreadable",
        uri=uri,
        options={"error": [reason, detail], "num_samples": 1},
    )


def resolve_columns(names: list[str], options: dict[str, Any]) -> dict[str, str | None]:
    """Pick the image/path/caption/url/key columns: explicit options first, then known names."""

    def pick(option: str, candidates: tuple[str, ...]) -> str | None:
        if options.get(option):
            if options[option] not in names:
                raise ValueError(f"{option}={options[option]!r} is not a column of {names}")
            return options[option]
        return next((c for c in candidates if c in names), None)

    image = pick("image_column", IMAGE_COLUMNS)
    path = None if options.get("image_column") else pick("path_column", PATH_COLUMNS)
    if image is None and path is None:
        raise ValueError(
            f"no image column among {names}: pass image_column=… (bytes) or path_column=… (paths)"
        )
    if image is not None and path is not None and not options.get("path_column"):
        path = None  # bytes win when both exist and nothing was asked for
    return {
        "image_column": image if path is None else None,
        "path_column": path,
        "caption_column": pick("caption_column", CAPTION_COLUMNS),
        "url_column": pick("url_column", URL_COLUMNS),
        "key_column": pick("key_column", KEY_COLUMNS),
    }


def read_partition(
    partition: Partition,
    storage: StorageOptions | None = None,
    max_bytes: int | None = None,
    max_group_bytes: int | None = None,
) -> Iterator[Sample]:
    """The row group's samples, read in batches of rows.

    ``max_group_bytes``: a row group whose columns to read hold more than this, uncompressed
    (by the file's metadata), is not read; each of its rows is a ``too_large`` error. Reading
    one needs about twice that in memory (pyarrow reads a column chunk whole), and a worker
    killed for memory would be retried on the same row group again and again.
    """
    opts = partition.options
    if "error" in opts:  # a file that could not be read when it was listed
        reason, detail = opts["error"]
        yield samples_error(partition.id, reason, detail)
        return
    wanted = [
        c
        for c in (
            opts["image_column"],
            opts["path_column"],
            opts["caption_column"],
            opts["url_column"],
            opts["key_column"],
        )
        if c
    ]
    base_dir = posixpath.dirname(partition.uri)
    anywhere = bool(opts.get("allow_outside"))
    stem = posixpath.basename(partition.uri).rsplit(".", 1)[0]

    def read_path(path: str) -> bytes:  # image paths are relative to the parquet file's folder
        return read_inside(base_dir, path, storage, max_bytes, anywhere=anywhere)

    with open_uri(partition.uri, storage) as f:
        pfile = pq.ParquetFile(f)
        present = set(pfile.schema_arrow.names)
        meta_columns = [c for c in META_COLUMNS if c in present and c not in wanted]
        group = pfile.metadata.row_group(opts["row_group"])
        size = _group_bytes(group, wanted + meta_columns)
        if max_group_bytes is not None and size > max_group_bytes:
            detail = (
                f"row group {opts['row_group']} of {partition.uri} holds {size:,} bytes "
                f"uncompressed, over the budget of {max_group_bytes:,} (embed.max_row_group_bytes"
                "): rewrite the file with smaller row groups"
            )
            keys = [opts["key_column"]] if opts["key_column"] else []
            for i, row in enumerate(_rows(pfile, opts["row_group"], keys, group)):
                yield samples_error(
                    _key(row, opts, stem, opts["first_row"] + i), "too_large", detail
                )
            return
        rows = _rows(pfile, opts["row_group"], wanted + meta_columns, group)
        yield from _samples(rows, opts, stem, meta_columns, read_path)


def _group_bytes(group: Any, columns: list[str]) -> int:
    """Uncompressed bytes of ``columns`` in a row group (a struct's leaves count for it)."""
    chunks = (group.column(j) for j in range(group.num_columns))
    return sum(
        c.total_uncompressed_size for c in chunks if c.path_in_schema.split(".")[0] in columns
    )


_BATCH_BYTES = 64 * 2**20  # rows turned into Python objects at a time


def _rows(
    pfile: pq.ParquetFile, group_index: int, columns: list[str], group: Any
) -> Iterator[dict]:
    if not columns:  # no column wanted: one empty row per row
        yield from ({} for _ in range(group.num_rows))
        return
    per_row = _group_bytes(group, columns) // max(group.num_rows, 1)
    batch = max(1, min(1024, _BATCH_BYTES // max(per_row, 1)))

    for record_batch in pfile.iter_batches(
        batch_size=batch, row_groups=[group_index], columns=columns, use_threads=False
    ):
        for i in range(record_batch.num_rows):  # a zero-copy slice: one row's values at a time
            yield record_batch.slice(i, 1).to_pylist()[0]


def _samples(
    rows: Iterator[dict],
    opts: dict[str, Any],
    stem: str,
    meta_columns: list[str],
    read_path: Callable[[str], bytes],
) -> Iterator[Sample]:
    for i, row in enumerate(rows):
        key = _key(row, opts, stem, opts["first_row"] + i)
        caption = row.get(opts["caption_column"]) if opts["caption_column"] else None
        url = row.get(opts["url_column"]) if opts["url_column"] else None
        extra = {c: row[c] for c in meta_columns if row.get(c) is not None}
        common: dict[str, Any] = {"caption": caption, "url": url, "extra": extra}
        status = row.get("status")
        if status is not None and status != "success":
            # img2dataset keeps failed downloads in its parquet output, without image bytes.
            yield samples_error(key, "not_downloaded", str(row.get("error_message")), **common)
            continue
        if opts["path_column"]:
            path = row.get(opts["path_column"])
            if not path:
                yield samples_error(key, "empty", "no image path", **common)
                continue
            data = None
        else:
            path, data = None, row.get(opts["image_column"])
            if isinstance(data, dict):  # Hugging Face Image feature: {"bytes": …, "path": …}
                path, data = data.get("path"), data.get("bytes") or None
        if data is None and path:
            try:
                data = read_path(str(path))
            except Refused as exc:
                yield samples_error(key, exc.reason, str(exc), **common)
                continue
            except FileNotFoundError:  # worded here: each filesystem words it differently
                yield samples_error(key, "missing", f"image file not found: {path}", **common)
                continue
            except OSError as exc:  # a folder, a file it may not read: this row only
                yield samples_error(key, "missing", f"cannot read {path}: {exc}", **common)
                continue
        if data is None:
            yield samples_error(key, "empty", "image column is null", **common)
            continue
        if not isinstance(data, bytes | bytearray):
            detail = f"image column holds {type(data).__name__}, not bytes"
            yield samples_error(key, "wrong_type", detail, **common)
            continue
        yield Sample(key=key, image=data, **common)


def _key(row: dict[str, Any], opts: dict[str, Any], stem: str, position: int) -> str:
    if opts["key_column"] and row.get(opts["key_column"]) is not None:
        return str(row[opts["key_column"]])
    if opts["path_column"] and row.get(opts["path_column"]):
        return str(row[opts["path_column"]])
    return f"{stem}/{position}"
