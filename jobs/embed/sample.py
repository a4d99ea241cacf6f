"""One sample -> a stage row: decode, preprocess, thumbnail. This is the code that meets the
bytes of the collection, so the decode stage runs it inside a sandbox worker
(``cachebind.sandbox``): a decoder that crashes natively, blows its memory cap or hangs costs
that sample an error row, not the partition.

Kept light on imports (no Ray, no LanceDB): a sandbox worker imports this module and
``cachebind.preprocess.image`` only.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

from cachebind.config import InputLimits, SandboxConfig
from cachebind.errors import InputError
from cachebind.storage import StorageOptions


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int
    max_bytes: int
    thumbnails: bool
    thumbnail_size: int
    pixel_dtype: str
    chunk_rows: int
    max_group_bytes: int | None = None
    """``embed.max_row_group_bytes``: a parquet row group over it is refused unread."""
    storage: StorageOptions = field(default_factory=StorageOptions, repr=False)
    """How workers reach object-store sources (travels with the task, not in the partition)."""
    sandbox: SandboxConfig = field(default_factory=lambda: SandboxConfig(workers=1))
    """Caps of the decode sandbox (one worker per decode task; its size is the task's)."""
    limits: InputLimits = field(default_factory=InputLimits)
    """``Settings.input``: the service's decode settings (colour profiles, budgets), so that a
    file embeds in the job as it does through the API; ``max_pixels`` / ``max_bytes`` (the
    job's own ``embed.max_image_*``) override its two image budgets."""
    views: int = 0
    """``embed.views``: augmented crops per sample (``cachebind.preprocess.views``), their
    pixels concatenated in ``view_pixels`` (N tensors beside the centre crop's ``pixels``)."""
    view_set: str = "random-crop"
    """``embed.view_set``: which views (seeded random crops, or SPHINX's five)."""
    extra: tuple[str, ...] = ()
    """``embed.extra_encoders``' names: each one's own preprocessing of the image
    (``cachebind.preprocess.extra``) travels as ``pixels_<name>``."""


def decode_samples(
    samples: list[tuple[Any, int]], shard: str, options: DecodeOptions
) -> list[dict[str, Any]]:
    """The sandbox worker's entry: ``decode_sample`` for each ``(sample, id)``."""
    return [decode_sample(sample, sid, shard, options) for sample, sid in samples]


def decode_sample(sample: Any, sid: int, shard: str, options: DecodeOptions) -> dict[str, Any]:
    """One sample -> an ``ok`` row (pixels, size, thumbnail) or an ``error`` row."""
    from cachebind.preprocess.image import image_tensor, load_image

    start = time.perf_counter()
    base = {"caption": sample.caption, "url": sample.url}
    if sample.error is not None:
        reason, detail = sample.error
        return error_row(sid, sample.key, shard, "read", reason, detail, base)
    try:
        img = load_image(
            sample.image,
            sample.key,
            max_pixels=options.max_pixels,
            max_bytes=options.max_bytes,
            limits=options.limits,
        )
        pixels = image_tensor(img).numpy().astype(options.pixel_dtype, copy=False)
        view_pixels = _view_pixels(img, sid, options) if options.views else None
        extra_pixels = {f"pixels_{n}": _extra_pixels(img, n, options) for n in options.extra}
        thumb = thumbnail_jpeg(img, options.thumbnail_size) if options.thumbnails else None
    except InputError as exc:
        return error_row(sid, sample.key, shard, "decode", exc.reason, exc.detail, base)
    except MemoryError:
        raise  # the sandbox answers it (too_large) and replaces its worker
    except Exception as exc:  # a decoder bug on one odd file: record it, keep going
        return error_row(sid, sample.key, shard, "decode", "undecodable", repr(exc), base)
    return {
        **empty_row(sid, shard),
        **base,
        "key": sample.key,
        "status": "ok",
        "width": img.width,
        "height": img.height,
        "pixels": pixels.tobytes(),
        "view_pixels": view_pixels,
        **extra_pixels,
        "thumbnail": thumb,
        "decode_s": time.perf_counter() - start,
    }


def _view_pixels(img: Any, sid: int, options: DecodeOptions) -> bytes:
    """The ``options.views`` views of ``img``, one after another, in the pixel dtype. Random
    crops are built one at a time, so the worker holds the image, one crop and the output
    bytes; SPHINX's five come from one 448-px resize, held with them."""
    from cachebind.preprocess.views import view_set_tensors, view_tensor

    out = bytearray()
    if options.view_set != "random-crop":
        for x in view_set_tensors(img, sid, options.views, options.view_set):
            out += x.numpy().astype(options.pixel_dtype, copy=False).tobytes()
        return bytes(out)
    for view in range(options.views):
        out += view_tensor(img, sid, view).numpy().astype(options.pixel_dtype, copy=False).tobytes()
    return bytes(out)


def _extra_pixels(img: Any, name: str, options: DecodeOptions) -> bytes:
    from cachebind.preprocess.extra import extra_tensor

    return extra_tensor(img, name).numpy().astype(options.pixel_dtype, copy=False).tobytes()


def thumbnail_jpeg(img: Any, size: int) -> bytes:
    """A JPEG whose longer side is at most ``size`` px (aspect ratio kept)."""
    from PIL import Image

    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()


def empty_row(sid: int, shard: str) -> dict[str, Any]:
    return {"id": sid, "key": "", "shard": shard, "count": 0, "decode_s": 0.0}


def error_row(
    sid: int,
    key: str,
    shard: str,
    stage: str,
    reason: str,
    detail: str,
    base: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        **empty_row(sid, shard),
        **(base or {}),
        "key": key,
        "status": "error",
        "stage": stage,
        "reason": reason,
        "detail": (detail or "")[:2000],
    }
