"""Images (JPEG, PNG, WebP, GIF, … any Pillow mode) -> the vision trunk's [3, 224, 224] input.

ImageBind's transform (``imagebind/data.py``): ``Resize(224, BICUBIC)``, ``CenterCrop(224)``,
``ToTensor()``, ``Normalize(CLIP mean, CLIP std)`` on ``Image.open(f).convert("RGB")``. torchvision
is not available here, so the same steps are written with Pillow (which torchvision itself uses
for PIL images) and torch.

Two deliberate differences from the reference's bare ``convert("RGB")``, both for images the
reference would mis-render:
- transparency (RGBA, LA, P with a transparent index) is composited over **white**, as a browser
  shows it, instead of being dropped (dropping alpha exposes whatever colour the transparent
  pixels happen to store, often black);
- 16-bit greyscale (``I;16``) is scaled to 8 bits (``>> 8``) instead of being clipped at 255.
EXIF orientation is applied (``exif_transpose``) so photos are encoded upright.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cachebind.errors import InputError
from cachebind.preprocess.common import (
    DEFAULT_MAX_BYTES,
    RawInput,
    as_stream,
    read_bytes,
    resize_center_crop,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own ``Image.MAX_IMAGE_PIXELS``: larger images are refused as decompression bombs."""

WHITE = (255, 255, 255)


def open_image(
    data: RawInput | Image.Image,
    source: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode ``data`` into a fully loaded PIL image in its own mode (first frame of a GIF).

    Raises InputError: ``decompression_bomb`` over ``max_pixels``, ``truncated`` for a cut-off
    file, ``undecodable`` for anything Pillow cannot read, plus ``read_bytes``'s reasons.
    Truncated files are never patched up (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False).
    """
    if isinstance(data, Image.Image):
        _check_pixels(data.size, source, max_pixels)
        return data
    raw = read_bytes(data, source, max_bytes)
    if _riff_truncated(raw):
        # libwebp only says "could not create decoder object": the RIFF header knows better.
        raise InputError(source, "truncated", "WebP file shorter than its RIFF header says")
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we enforce our own
        # limit from the header, so its warning only matters when our limit is not looser.
        if max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        else:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(as_stream(raw))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(source, "decompression_bomb", str(e)) from e
        except UnidentifiedImageError as e:
            raise InputError(source, "undecodable", "not an image Pillow can identify") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            reason = "truncated" if _looks_truncated(str(e)) else "undecodable"
            raise InputError(source, reason, str(e)) from e
        # The header alone gives the size: refuse before any pixel is decoded.
        _check_pixels(img.size, source, max_pixels)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            msg = str(e)
            reason = "truncated" if _looks_truncated(msg) else "undecodable"
            raise InputError(source, reason, msg) from e
    return img


def to_rgb(img: Image.Image, source: str = "<input>", background=WHITE) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited over ``background``, 16-bit grey scaled down."""
    # A broken EXIF block must not lose an otherwise good image.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(source, "unsupported_format", f"{mode} values outside 16 bits")
        grey = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        raise InputError(source, "unsupported_format", "floating-point images have no colour scale")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(source, "unsupported_format", f"mode {mode}: {e}") from e


def load_image(
    data: RawInput | Image.Image,
    source: str = "<input>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """The decode stage: ``data`` -> an RGB PIL image (see module docstring for mode handling)."""
    img = open_image(data, source, max_pixels=max_pixels, max_bytes=max_bytes)
    return to_rgb(img, source)


def image_tensor(img: Image.Image) -> torch.Tensor:
    """The transform stage: RGB PIL image -> normalised float32 [3, 224, 224].

    Resize short side to 224 (bicubic), centre crop 224, ToTensor (/255), CLIP Normalize.
    """
    if img.mode != "RGB":
        raise ValueError(f"image_tensor expects an RGB image, got mode {img.mode}")
    crop = resize_center_crop(img)
    x = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(255.0)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)


def preprocess_image(
    data: RawInput | Image.Image,
    source: str = "<input>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """``load_image`` then ``image_tensor``: one image -> [3, 224, 224] float32."""
    return image_tensor(load_image(data, source, max_pixels=max_pixels, max_bytes=max_bytes))


def _check_pixels(size: tuple[int, int], source: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(source, "empty", f"image of size {width}x{height}")
    if width * height > max_pixels:
        raise InputError(
            source, "decompression_bomb", f"{width}x{height} = {width * height} px > {max_pixels}"
        )


def _looks_truncated(msg: str) -> bool:
    msg = msg.lower()
    return any(s in msg for s in ("truncated", "broken data stream", "premature end", "eof"))


def _riff_truncated(raw: bytes) -> bool:
    """True for a WebP whose RIFF chunk size promises more bytes than the file has."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WEBP":
        return False
    return int.from_bytes(raw[4:8], "little") + 8 > len(raw)
