"""Stage 1, the mapper on CPU workers: read a partition, decode and preprocess each sample.

Bad samples become error rows (stage, reason) instead of failing the task."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from cachebind.errors import InputError
from cachebind.sources import Partition, StorageOptions, read_partition
from cachebind.store import row_id

PIXELS = (3, 224, 224)

# Columns between the stages. ``status`` is "ok" (pixels to encode), "error" (goes to the errors
# table) or "done" (one marker per partition: ``count`` distinct ids were emitted for it).
STAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("status", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("pixels", pa.binary()),
        pa.field("thumbnail", pa.binary()),
        pa.field("count", pa.int64()),
        pa.field("decode_s", pa.float64()),
    ]
)


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int
    max_bytes: int
    thumbnails: bool
    thumbnail_size: int
    pixel_dtype: str
    chunk_rows: int
    storage: StorageOptions = field(default_factory=StorageOptions, repr=False)
    """How workers reach object-store sources (travels with the task, not in the partition)."""


def decode_partition(batch: pa.Table, *, options: DecodeOptions) -> Iterator[pa.Table]:
    """Read each partition of ``batch`` and yield blocks of decoded samples, then its marker.

    Bad samples become ``error`` rows (reason from ``InputError``) instead of exceptions, so a
    corrupt image never fails the task; ids in the partition's ``skip`` list (committed by an
    earlier run) are not decoded at all.
    """
    for item in batch.to_pylist():
        partition = Partition.from_dict(json.loads(item["partition"]))
        skip = set(json.loads(item["skip"]))
        rows: list[dict[str, Any]] = []
        emitted: set[int] = set()
        try:
            for sample in read_partition(partition, options.storage):
                sid = row_id(sample.key)
                if sid in skip or sid in emitted:
                    continue
                emitted.add(sid)
                rows.append(decode_sample(sample, sid, partition.id, options))
                if len(rows) >= options.chunk_rows:
                    yield pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)
                    rows = []
        except Exception as exc:  # an unreadable shard must not stop the job
            key = f"{partition.id}#unreadable"
            sid = row_id(key)
            if sid not in emitted:
                emitted.add(sid)
                rows.append(
                    _error_row(sid, key, partition.id, "read", "unreadable", repr(exc), None)
                )
        marker = _empty_row(row_id(f"{partition.id}#done"), partition.id)
        rows.append({**marker, "status": "done", "count": len(emitted)})
        yield pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def decode_sample(sample: Any, sid: int, shard: str, options: DecodeOptions) -> dict[str, Any]:
    """One sample -> an ``ok`` row (pixels, size, thumbnail) or an ``error`` row."""
    from cachebind.preprocess.image import image_tensor, load_image

    start = time.perf_counter()
    base = {"caption": sample.caption, "url": sample.url}
    if sample.error is not None:
        reason, detail = sample.error
        return _error_row(sid, sample.key, shard, "read", reason, detail, base)
    try:
        img = load_image(
            sample.image, sample.key, max_pixels=options.max_pixels, max_bytes=options.max_bytes
        )
        pixels = image_tensor(img).numpy().astype(options.pixel_dtype, copy=False)
        thumb = thumbnail_jpeg(img, options.thumbnail_size) if options.thumbnails else None
    except InputError as exc:
        return _error_row(sid, sample.key, shard, "decode", exc.reason, exc.detail, base)
    except Exception as exc:  # a decoder bug on one odd file: record it, keep going
        return _error_row(sid, sample.key, shard, "decode", "undecodable", repr(exc), base)
    return {
        **_empty_row(sid, shard),
        **base,
        "key": sample.key,
        "status": "ok",
        "width": img.width,
        "height": img.height,
        "pixels": pixels.tobytes(),
        "thumbnail": thumb,
        "decode_s": time.perf_counter() - start,
    }


def thumbnail_jpeg(img: Any, size: int) -> bytes:
    """A JPEG whose longer side is at most ``size`` px (aspect ratio kept)."""
    from PIL import Image

    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _empty_row(sid: int, shard: str) -> dict[str, Any]:
    return {"id": sid, "key": "", "shard": shard, "count": 0, "decode_s": 0.0}


def _error_row(
    sid: int,
    key: str,
    shard: str,
    stage: str,
    reason: str,
    detail: str,
    base: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        **_empty_row(sid, shard),
        **(base or {}),
        "key": key,
        "status": "error",
        "stage": stage,
        "reason": reason,
        "detail": (detail or "")[:2000],
    }
