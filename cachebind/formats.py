"""The one table of image formats: what the embedding job and the service decode, by name,
Pillow plugin and file extension, and how bytes that are no supported image are told apart.

Both the job's readers (which files of a folder or members of a tar are images) and the decoder
(``cachebind.preprocess.image``, which Pillow plugins may open the bytes) read this table, so
a file embeds in one exactly when it embeds in the other (docs/formats.md).

Kept free of Pillow and torch imports: source readers import it on the driver.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

HEIF_PLUGIN = "pillow_heif"
"""The package that brings HEIC/HEIF to Pillow (``pillow-heif``); without it they are refused."""


@dataclass(frozen=True)
class ImageFormat:
    """One supported format: its name in messages and docs, the Pillow plugins that decode it
    (in the order they are tried) and the file extensions a reader takes for it."""

    name: str
    pillow: tuple[str, ...]
    extensions: tuple[str, ...]
    plugin: str | None = None
    """A package that must be installed for Pillow to read the format (None: Pillow itself)."""

    @property
    def available(self) -> bool:
        return self.plugin is None or _installed(self.plugin)


@functools.cache
def _installed(package: str) -> bool:
    """Whether ``package`` can be imported (asked once per process: the decoder asks on every
    image, and a missing package is searched for along the whole ``sys.path``)."""
    return importlib.util.find_spec(package) is not None


TABLE: tuple[ImageFormat, ...] = (
    ImageFormat("JPEG", ("JPEG",), ("jpg", "jpeg", "jpe", "jfif")),
    ImageFormat("PNG", ("PNG",), ("png",)),
    ImageFormat("WebP", ("WEBP",), ("webp",)),
    ImageFormat("GIF", ("GIF",), ("gif",)),
    ImageFormat("BMP", ("BMP", "DIB"), ("bmp", "dib")),
    ImageFormat("TIFF", ("TIFF",), ("tif", "tiff")),
    ImageFormat("AVIF", ("AVIF",), ("avif",)),
    ImageFormat("HEIC/HEIF", ("HEIF",), ("heic", "heif"), plugin=HEIF_PLUGIN),
    ImageFormat("JPEG 2000", ("JPEG2000",), ("jp2", "j2k", "j2c", "jpc", "jpf", "jpx")),
    ImageFormat("PNM (PPM, PGM, PBM)", ("PPM",), ("ppm", "pgm", "pbm", "pnm")),
    ImageFormat("ICO", ("ICO",), ("ico",)),
    ImageFormat("PSD", ("PSD",), ("psd",)),
    # TGA has no signature: Pillow can only try to parse its header, so it is tried last.
    ImageFormat("TGA", ("TGA",), ("tga",)),
)
"""Every format decoded, in the order readers prefer a sample's members (a tar key with both a
``.jpg`` and a ``.png`` member is its ``.jpg``). Multi-frame files give their first frame (GIF,
TIFF, ICO: its largest image; PSD: the flattened composite)."""

KNOWN_UNSUPPORTED_EXTENSIONS = ("svg", "svgz", "pdf", "eps", "ps", "ai", "jxl", "raw", "psb")
"""Extensions of images (or image-like documents) that are never decoded: a folder file or tar
member with one of them is an ``unsupported_format`` error without being read."""

SIDECAR_EXTENSIONS = ("txt", "json")
"""A folder's caption (``x.txt``) and metadata (``x.json``) files: read beside the sample of
the same stem, never samples themselves; the job's report counts them."""


def supported() -> tuple[ImageFormat, ...]:
    """The formats this installation decodes (HEIC/HEIF only with its plug-in)."""
    return tuple(f for f in TABLE if f.available)


def image_extensions() -> tuple[str, ...]:
    """The extensions read as images, in order of preference."""
    return tuple(ext for f in supported() for ext in f.extensions)


def unsupported_extensions() -> tuple[str, ...]:
    """Extensions refused by name: the known non-decoded ones and formats of the table whose
    plug-in is not installed."""
    missing = tuple(ext for f in TABLE if not f.available for ext in f.extensions)
    return KNOWN_UNSUPPORTED_EXTENSIONS + missing


def pillow_formats() -> tuple[str, ...]:
    """The Pillow plugin ids the decoder lets open an image, in the order it tries them."""
    return tuple(pid for f in supported() for pid in f.pillow)


def supported_names() -> str:
    """``JPEG, PNG, …``: the list every ``unsupported_format`` detail ends with."""
    return ", ".join(f.name for f in supported())


def unsupported_detail(what: str) -> str:
    """The detail of an ``unsupported_format`` error for ``what`` (a format or file name)."""
    return f"{what} is not a supported image format (supported: {supported_names()})"


_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_ISO_BRANDS = {
    **dict.fromkeys(_HEIF_BRANDS, "HEIC/HEIF"),
    b"avif": "AVIF",
    b"avis": "AVIF",
    b"crx ": "Canon CR3 raw",
}
"""ISO media ``ftyp`` brands -> the format they claim (any other brand is a video)."""

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x1f\x8b", "gzip data (an .svgz drawing?)"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
    (b"OggS", "an Ogg stream"),
    (b"fLaC", "FLAC audio"),
    (b"ID3", "MP3 audio"),
    (b"8BPS\x00\x02", "PSB (large-document Photoshop)"),
)


def sniff_non_image(head: bytes) -> str | None:
    """What the first bytes of a file show it to be when that is a known format no decoder
    takes (SVG, PDF, EPS, JPEG XL, HEIC without its plug-in, a video …), else None: bytes that
    show nothing known are ``undecodable``, not ``unsupported_format``."""
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head[4:8] == b"ftyp":
        name = _ISO_BRANDS.get(head[8:12], "an MP4/QuickTime video")
        table = {f.name: f for f in TABLE}.get(name)
        if table is None:
            return name
        # A supported format whose bytes broke is undecodable, not unsupported.
        return None if table.available else f"{name} (without the {table.plugin} plug-in)"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"WAVE"):
        return "an AVI video" if head[8:12] == b"AVI " else "WAV audio"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text[:4096] and text.startswith((b"<?xml", b"<svg", b"<!doctype svg", b"<!--")):
        return "SVG (a vector drawing)"
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    return None
