"""What every modality's loader shares: reading raw input bytes under a size limit, and the
ImageBind/torchvision resize-and-crop geometry used by image, depth and thermal inputs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from cachebind.errors import InputError

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Inputs larger than this are refused as ``too_large`` before any decoding (EmbedConfig)."""

IMAGE_SIZE = 224
"""Side of the square every vision-like trunk (vision, depth, thermal) takes."""

RawInput = bytes | bytearray | memoryview | str | Path | BinaryIO


def read_bytes(data: RawInput, source: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The raw bytes of ``data`` (bytes, a file path or a binary file object), <= ``max_bytes``.

    Raises InputError ``not_found`` for a missing path, ``too_large`` over the limit, ``empty``
    for zero bytes and ``wrong_type`` for anything else.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise InputError(source, "too_large", f"{len(raw)} bytes > limit {max_bytes}")
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
            raise InputError(source, "too_large", f"{size} bytes > limit {max_bytes}")
        raw = path.read_bytes()
    elif hasattr(data, "read"):
        # Read one byte past the limit so an oversized stream is detected without reading it all.
        raw = data.read(max_bytes + 1)
        if not isinstance(raw, bytes):
            raise InputError(source, "wrong_type", "file object must be opened in binary mode")
        if len(raw) > max_bytes:
            raise InputError(source, "too_large", f"more than {max_bytes} bytes")
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
    """
    width, height = img.size
    new_size = resize_size(width, height, size)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    return img.crop(center_crop_box(*new_size, size))
