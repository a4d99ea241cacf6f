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
EXIF orientation is applied (``exif_transpose``) so photos are encoded upright, and (with
``input.honour_pixel_metadata``, the default) an embedded ICC profile is honoured: see
``cachebind.preprocess.colour``.

Only the formats of ``cachebind.formats`` are opened (Pillow's other plugins, EPS with its
Ghostscript call among them, are never tried): bytes of a known format outside the table are
``unsupported_format`` naming the supported list, bytes that match no known format or claim a
supported one and break are ``undecodable`` / ``truncated``.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cachebind import formats
from cachebind.config import InputLimits
from cachebind.errors import InputError
from cachebind.preprocess.colour import to_srgb
from cachebind.preprocess.common import (
    DEFAULT_LIMITS,
    RawInput,
    as_stream,
    over_limit,
    read_bytes,
    resize_center_crop,
    resolve_limits,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_PIXELS = DEFAULT_LIMITS.max_image_pixels
"""``input.max_image_pixels``: larger images are refused as decompression bombs."""

_PILLOW_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")

WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF tag
_SNIFF_BYTES = 4096
"""Bytes of a file that its sniffing looks at (signatures sit at the start; SVG's root element
may follow an XML prolog and comments)."""

try:  # HEIC/HEIF, when its plug-in is installed (docs/formats.md)
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # refused by name instead: formats.unsupported_extensions
    pass
_HEIF_MODULE = formats.HEIF_PLUGIN + "."
"""The plug-in's own Pillow plugins belong to the table (HEIF), not to a deployment's extras."""


def allowed_plugins() -> list[str]:
    """The Pillow plugin ids ``open_image`` lets open bytes: the format table's, then any
    plugin registered from outside Pillow (a deployment's own decoder, installed on purpose)."""
    Image.init()
    table = list(formats.pillow_formats())
    extra = [
        pid
        for pid, (factory, _) in Image.OPEN.items()
        if pid not in table and not factory.__module__.startswith(("PIL.", _HEIF_MODULE))
    ]
    return [pid for pid in table if pid in Image.OPEN] + extra


def open_image(
    data: RawInput | Image.Image,
    source: str,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> Image.Image:
    """Decode ``data`` into a fully loaded PIL image in its own mode (first frame of a GIF).

    Raises InputError: ``decompression_bomb`` over ``input.max_image_pixels``, ``too_large``
    over ``input.max_image_aspect_ratio`` (both from the header, before any pixel is decoded),
    ``truncated`` for a cut-off file, ``undecodable`` for anything Pillow cannot read, plus
    ``read_bytes``'s reasons. ``max_pixels`` / ``max_bytes`` override ``limits``' values.
    Truncated files are never patched up (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False).
    """
    limits = resolve_limits(limits, max_pixels=max_pixels, max_bytes=max_bytes)
    if isinstance(data, Image.Image):
        check_image_size(data.size, source, limits)
        return data
    raw = read_bytes(data, source, limits.max_bytes)
    if _riff_truncated(raw):
        # libwebp only says "could not create decoder object": the RIFF header knows better.
        raise InputError(source, "truncated", "WebP file shorter than its RIFF header says")
    try:
        return _decode(raw, source, limits)
    except InputError as e:
        # Pillow refuses a PNG whose profile or text inflates past MAX_TEXT_CHUNK (1 MiB) as
        # a whole; metadata never changes pixels, so the image is read without it (a profile
        # over budget is ignored, as in every other format).
        bare = _png_without_metadata(raw) if "MAX_TEXT_CHUNK" in e.detail else None
        if bare is None:
            raise
        return _decode(bare, source, limits)


def _decode(raw: bytes, source: str, limits: InputLimits) -> Image.Image:
    with warnings.catch_warnings():
        # We enforce our own limit from the header; Pillow's warning is noise, and its hard
        # error (above twice its MAX_IMAGE_PIXELS) is reported with our limit, not Pillow's.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(as_stream(raw), formats=allowed_plugins())
        except Image.DecompressionBombError as e:
            found = _PILLOW_BOMB_SIZE.search(str(e))
            size = f"{int(found.group(1)):,} px" if found else "more pixels than Pillow allows"
            detail = f"{size} > input.max_image_pixels = {limits.max_image_pixels:,}"
            raise InputError(source, "decompression_bomb", detail) from e
        except UnidentifiedImageError as e:
            raise unidentified(raw, source) from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            reason = "truncated" if _looks_truncated(str(e)) else "undecodable"
            raise InputError(source, reason, str(e)) from e
        # The header alone gives the size: refuse before any pixel is decoded.
        check_image_size(img.size, source, limits)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            msg = str(e)
            reason = "truncated" if _looks_truncated(msg) else "undecodable"
            raise InputError(source, reason, msg) from e
    return img


def unidentified(raw: bytes, source: str) -> InputError:
    """Why no allowed plugin opened ``raw``: ``unsupported_format`` when its bytes show a known
    format outside the table (SVG, PDF, a Pillow format not in the table …), else
    ``undecodable`` (nothing known, or a supported format's bytes that break)."""
    head = raw[:_SNIFF_BYTES]
    known = formats.sniff_non_image(head) or _other_pillow_format(head)
    if known is not None:
        return InputError(source, "unsupported_format", formats.unsupported_detail(known))
    detail = f"not an image in a supported format ({formats.supported_names()})"
    return InputError(source, "undecodable", detail)


def _other_pillow_format(head: bytes) -> str | None:
    """The Pillow format outside the table whose signature ``head`` carries (its ``_accept``
    looks at the prefix only; the plugin itself never runs)."""
    allowed = set(allowed_plugins())
    for pid, (_, accept) in Image.OPEN.items():
        if pid in allowed or accept is None:
            continue
        with contextlib.suppress(Exception):
            if accept(head[:16]):
                return pid
    return None


def to_rgb(
    img: Image.Image,
    source: str = "<input>",
    background=WHITE,
    *,
    limits: InputLimits | None = None,
) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited over ``background``, 16-bit grey scaled down,
    an embedded colour profile converted to sRGB (``to_srgb``, under ``limits``)."""
    # A broken EXIF block must not lose an otherwise good image. exif_transpose copies the
    # whole image even when there is nothing to turn: only call it when there is.
    with contextlib.suppress(Exception):
        if img.getexif().get(_ORIENTATION, 1) in range(2, 9):
            img = ImageOps.exif_transpose(img)
    limits = limits or DEFAULT_LIMITS
    if limits.honour_pixel_metadata:
        img = to_srgb(img, limits.max_icc_profile_bytes)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InputError(source, "unsupported_format", f"{mode} values outside 16 bits")
        grey = (arr >> 8).astype(np.uint8)  # in range: no wider copy needed
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        raise InputError(source, "unsupported_format", "floating-point images have no colour scale")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        return _composite(img, background)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(source, "unsupported_format", f"mode {mode}: {e}") from e


_STRIP_PIXELS = 1 << 20
"""Compositing works on strips of about this many pixels (a few MB of RGBA at a time)."""


def _composite(img: Image.Image, background) -> Image.Image:
    """``img`` over an opaque ``background`` as RGB, one strip of rows at a time.

    The same per-pixel operations as converting the whole image to RGBA and calling
    ``alpha_composite`` on a full canvas, but the only full-size buffer is the RGB result (a
    49 MP RGBA image would otherwise hold three more full copies)."""
    width, height = img.size
    out = Image.new("RGB", img.size)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        strip = img.crop(box).convert("RGBA")
        canvas = Image.new("RGBA", strip.size, (*background, 255))
        canvas.alpha_composite(strip)
        out.paste(canvas.convert("RGB"), box[:2])
    return out


def load_image(
    data: RawInput | Image.Image,
    source: str = "<input>",
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> Image.Image:
    """The decode stage: ``data`` -> an RGB PIL image (see module docstring for mode handling)."""
    limits = resolve_limits(limits, max_pixels=max_pixels, max_bytes=max_bytes)
    return to_rgb(open_image(data, source, limits=limits), source, limits=limits)


def image_tensor(img: Image.Image) -> torch.Tensor:
    """The transform stage: RGB PIL image -> normalised float32 [3, 224, 224].

    Resize short side to 224 (bicubic), centre crop 224, ToTensor (/255), CLIP Normalize.
    """
    if img.mode != "RGB":
        raise ValueError(f"image_tensor expects an RGB image, got mode {img.mode}")
    return normalised_tensor(resize_center_crop(img))


def normalised_tensor(crop: Image.Image) -> torch.Tensor:
    """An RGB image (a 224 x 224 crop; SPHINX's 448 square) -> ToTensor (/255) then CLIP
    Normalize: float32 [3, H, W]."""
    x = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(255.0)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)


def preprocess_image(
    data: RawInput | Image.Image,
    source: str = "<input>",
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    limits: InputLimits | None = None,
) -> torch.Tensor:
    """``load_image`` then ``image_tensor``: one image -> [3, 224, 224] float32."""
    img = load_image(data, source, max_pixels=max_pixels, max_bytes=max_bytes, limits=limits)
    return image_tensor(img)


def check_image_size(size: tuple[int, int], source: str, limits: InputLimits) -> None:
    """Refuse a width x height (of an image, depth or thermal map) over the pixel or aspect
    ratio budget; shared by every loader that ends in ``resize_center_crop``."""
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(source, "empty", f"image of size {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise InputError(
            source,
            "decompression_bomb",
            f"{width}x{height} = {width * height:,} px > input.max_image_pixels"
            f" = {limits.max_image_pixels:,}",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_image_aspect_ratio:
        raise over_limit(
            source,
            "too_large",
            f"{width}x{height}: aspect ratio",
            round(ratio, 1),
            "max_image_aspect_ratio",
            limits.max_image_aspect_ratio,
        )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA = (b"iCCP", b"zTXt", b"iTXt", b"tEXt")


def _png_without_metadata(raw: bytes) -> bytes | None:
    """``raw`` (a PNG) without its profile and text chunks, or None when it is no PNG or its
    chunk list does not parse (then the first error stands)."""
    if not raw.startswith(_PNG_SIGNATURE):
        return None
    out, pos = bytearray(_PNG_SIGNATURE), len(_PNG_SIGNATURE)
    while pos + 12 <= len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(raw):
            return None
        if raw[pos + 4 : pos + 8] not in _PNG_METADATA:
            out += raw[pos:end]
        pos = end
    return bytes(out) if pos == len(raw) else None


def _looks_truncated(msg: str) -> bool:
    msg = msg.lower()
    return any(s in msg for s in ("truncated", "broken data stream", "premature end", "eof"))


def _riff_truncated(raw: bytes) -> bool:
    """True for a WebP whose RIFF chunk size promises more bytes than the file has."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WEBP":
        return False
    return int.from_bytes(raw[4:8], "little") + 8 > len(raw)
