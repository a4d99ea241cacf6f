"""A folder holding one file of every extension of the format table, files refused by name or
by their bytes, and caption/metadata sidecars, with the outcome each file must end with."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import fixtures_media as fm
import numpy as np
from PIL import Image

from cachebind import formats
from cachebind.preprocess import image as _registers_heif  # noqa: F401 - Pillow learns HEIF

SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
JXL = b"\xff\x0a" + bytes(range(64))

_PILLOW_SAVE = {
    # extension: (Pillow format, mode, save options)
    "dib": ("DIB", "RGB", {}),
    "j2k": ("JPEG2000", "RGB", {"no_jp2": True}),
    "j2c": ("JPEG2000", "RGB", {"no_jp2": True}),
    "jpc": ("JPEG2000", "RGB", {"no_jp2": True}),
    "pgm": ("PPM", "L", {}),
    "pbm": ("PPM", "1", {}),
}


def picture(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.fromarray(fm.pattern_rgb(*size, seed=seed), "RGB")


def psd(img: Image.Image) -> bytes:
    """A flattened 8-bit RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    width, height = img.size
    planes = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, resources, layers: none
    return header + sections + struct.pack(">H", 0) + planes.tobytes()  # 0: raw planes


def encode(ext: str, seed: int) -> bytes:
    """A small picture saved in the format the table maps ``ext`` to."""
    img = picture(seed)
    if ext == "psd":
        return psd(img)
    table = next(f for f in formats.supported() if ext in f.extensions)
    fmt, mode, options = _PILLOW_SAVE.get(ext, (table.pillow[0], "RGB", {}))
    out = io.BytesIO()
    img.convert(mode).save(out, fmt, **options)
    return out.getvalue()


def write(root: Path) -> tuple[Path, dict[str, str], int]:
    """(folder, {file name: outcome ("ok" or the error reason)}, sidecar files)."""
    folder = root / "formats"
    folder.mkdir(parents=True)
    outcomes: dict[str, str] = {}
    for seed, ext in enumerate(formats.image_extensions()):
        name = f"photo_{ext}.{ext}"
        (folder / name).write_bytes(encode(ext, seed))
        outcomes[name] = "ok"
    refused = {
        "drawing.svg": SVG,  # refused by name in the job, by its bytes in the service
        "paper.pdf": PDF,
        "figure.eps": EPS,
        "next.jxl": JXL,
        "clip.mp4": fm.video_bytes("mp4", 0.5),  # known bytes, unknown extension
        "old.pcx": _pillow_bytes("PCX"),  # a format Pillow reads, outside the table
        "scan.sgi": _pillow_bytes("SGI"),
    }
    for name, data in refused.items():
        (folder / name).write_bytes(data)
        outcomes[name] = "unsupported_format"
    (folder / "junk.bin").write_bytes(fm.garbage(2048, seed=7))
    outcomes["junk.bin"] = "undecodable"
    (folder / "broken.jpe").write_bytes(encode("jpe", 99)[:200])  # claims JPEG, cut short
    outcomes["broken.jpe"] = "truncated"
    (folder / "photo_jpg.txt").write_text("a caption")
    (folder / "photo_png.json").write_text('{"url": "http://example.com/p.png"}')
    (folder / "lonely.txt").write_text("a caption without an image")
    return folder, outcomes, 3


def _pillow_bytes(fmt: str) -> bytes:
    out = io.BytesIO()
    picture(5).save(out, fmt)
    return out.getvalue()


def key_of(name: str) -> str:
    """The job's key of a file of this folder (no two of its images share a stem)."""
    stem, _, ext = name.rpartition(".")
    known = formats.image_extensions() + formats.unsupported_extensions()
    return stem if ext in known else name
