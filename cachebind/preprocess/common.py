"""What every modality's loader shares: the input budgets (``InputLimits``), reading raw input
bytes under a size limit, and the ImageBind/torchvision resize-and-crop geometry used by image,
depth and thermal inputs."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from cachebind.config import InputLimits
from cachebind.errors import InputError

DEFAULT_LIMITS = InputLimits()
"""The budgets used when a caller passes none (``[input]`` in the configuration)."""

DEFAULT_MAX_BYTES = DEFAULT_LIMITS.max_bytes
"""Inputs larger than this are refused as ``too_large`` before any decoding."""

MAX_INTERMEDIATE_PIXELS = 16 * 224 * 224
"""A resize whose full output would exceed this (aspect ratio above 16) computes only the centre
crop; below, the full resize runs exactly as torchvision's (bit-identical to the reference)."""

IMAGE_SIZE = 224
"""Side of the square every vision-like trunk (vision, depth, thermal) takes."""

RawInput = bytes | bytearray | memoryview | str | Path | BinaryIO


def resolve_limits(limits: InputLimits | None = None, **overrides: float | None) -> InputLimits:
    """``limits`` (or the defaults) with the legacy per-call keyword limits that are not None
    applied over them (``max_pixels=`` is ``max_image_pixels``)."""
    limits = limits or DEFAULT_LIMITS
    updates = {k: v for k, v in overrides.items() if v is not None}
    if "max_pixels" in updates:
        updates["max_image_pixels"] = updates.pop("max_pixels")
    return limits.model_copy(update=updates) if updates else limits


def over_limit(source: str, reason: str, what: str, value: float, field: str, limit: float):
    """The InputError for ``what`` (``value``) above ``input.<field>`` (``limit``)."""
    return InputError(source, reason, f"{what} {value:,} > input.{field} = {limit:,}")


def read_bytes(data: RawInput, source: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The raw bytes of ``data`` (bytes, a file path or a binary file object), <= ``max_bytes``.

    Raises InputError ``not_found`` for a missing path, ``too_large`` over the limit, ``empty``
    for zero bytes and ``wrong_type`` for anything else.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise over_limit(source, "too_large", "bytes", len(raw), "max_bytes", max_bytes)
    elif isinstance(data, str | Path):
        path = Path(data)
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError) as e:
            raise InputError(source, "not_found", f"no such file: {path}") from e
        except OSError as e:
            raise InputError(source, "unreadable", f"{path}: {e}") from e
        if not path.is_file():
            raise InputError(source, "unreadable", f"{path} is not a regular file")
        if size > max_bytes:
            raise over_limit(source, "too_large", "bytes", size, "max_bytes", max_bytes)
        raw = path.read_bytes()
    elif hasattr(data, "read"):
        # Read one byte past the limit so an oversized stream is detected without reading it all.
        raw = data.read(max_bytes + 1)
        if not isinstance(raw, bytes):
            raise InputError(source, "wrong_type", "file object must be opened in binary mode")
        if len(raw) > max_bytes:
            raise InputError(
                source, "too_large", f"more than input.max_bytes = {max_bytes:,} bytes"
            )
    else:
        raise InputError(source, "wrong_type", f"cannot read {type(data).__name__} as a file")
    if not raw:
        raise InputError(source, "empty", "zero bytes")
    return raw


def as_stream(raw: bytes) -> io.BytesIO:
    """A seekable in-memory stream (PyAV and Pillow both want one)."""
    return io.BytesIO(raw)


def resize_size(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(new_width, new_height) with the short side ``size``, as torchvision's ``Resize(size)``.

    torchvision keeps the short side at ``size`` and truncates the long side to
    ``int(size * long / short)``; ImageBind's ``Resize(224, BICUBIC)`` therefore never rounds up.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's ``CenterCrop(size)`` (Python ``round``)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def resize_center_crop(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """``Resize(size, BICUBIC)`` then ``CenterCrop(size)`` on a PIL image of any single mode.

    This is what ImageBind's vision transform does on a PIL image (torchvision resizes PIL images
    with Pillow itself, so the pixels match torchvision's exactly).

    When the resized image would exceed ``MAX_INTERMEDIATE_PIXELS`` (a long thin input: 30000x2
    would become 3,360,000x224), only the centre crop is computed: ``_crop_then_resize``.
    """
    width, height = img.size
    new_size = resize_size(width, height, size)
    box = center_crop_box(*new_size, size)
    if new_size == img.size:
        return img.crop(box)
    if new_size[0] * new_size[1] <= MAX_INTERMEDIATE_PIXELS:
        return img.resize(new_size, Image.Resampling.BICUBIC).crop(box)
    return _crop_then_resize(img, new_size, box)


_BICUBIC_SUPPORT = 2.0


def _crop_then_resize(
    img: Image.Image, new_size: tuple[int, int], box: tuple[int, int, int, int]
) -> Image.Image:
    """``img.resize(new_size, BICUBIC).crop(box)`` without the full-size intermediate.

    Pillow resizes in two passes, horizontal first (rounding to the mode's precision between
    them); so do we, each pass on Pillow's own ``box`` and only over the source rows the
    vertical filter reads for the crop's rows. Every output pixel keeps its filter centre and
    support, so the result equals the full resize's crop at O(crop + strip) memory (up to one
    8-bit level on a few pixels, where the long side's fractional box rounds differently).
    """
    width, height = img.size
    sx, sy = width / new_size[0], height / new_size[1]
    left, top, right, bottom = box
    # The crop spans the short side whole: give Pillow that side's exact bounds so its scale is
    # computed from the same integers as in the full resize.
    x0, x1 = (0, width) if right - left == new_size[0] else (left * sx, right * sx)
    y0, y1 = (0, height) if bottom - top == new_size[1] else (top * sy, bottom * sy)
    reach = _BICUBIC_SUPPORT * max(sy, 1.0)
    r0 = max(0, math.floor(y0 - reach))
    r1 = min(height, math.ceil(y1 + reach) + 1)
    strip = img.crop((0, r0, width, r1))
    rows = r1 - r0
    if new_size[0] != width:
        strip = strip.resize((right - left, rows), Image.Resampling.BICUBIC, box=(x0, 0, x1, rows))
    else:
        strip = strip.crop((left, 0, right, rows))
    if new_size[1] != height:
        return strip.resize(
            (right - left, bottom - top),
            Image.Resampling.BICUBIC,
            box=(0, y0 - r0, right - left, y1 - r0),
        )
    return strip.crop((0, top - r0, right - left, bottom - r0))
