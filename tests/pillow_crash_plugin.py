"""A test-only Pillow plugin whose decoder really crashes, as a native decoder bug would.

Importing it registers the ``CBCRASH`` format: files that start with ``MAGIC`` and then hold a
width and a height. Opening one reads that header like any plugin; decoding its pixels reads
memory at address 0, and the process dies of ``SIGSEGV``. Production code never imports it:
tests put a ``sitecustomize.py`` that does on the Python path of the processes they start.
"""

from __future__ import annotations

import ctypes
import struct

from PIL import Image, ImageFile

MAGIC = b"CBCRASH\0"


def crashing_image(width: int = 32, height: int = 24) -> bytes:
    return MAGIC + struct.pack("<II", width, height)


class CrashImageFile(ImageFile.ImageFile):
    format = "CBCRASH"
    format_description = "an image whose decoder segfaults (tests only)"

    def _open(self) -> None:
        header = self.fp.read(16)
        width, height = struct.unpack("<II", header[8:16])
        self._size = (width, height)
        self._mode = "RGB"

    def load(self):  # noqa: ANN201 - Pillow's signature
        ctypes.string_at(0)  # a read of address 0: SIGSEGV, no Python exception


def _accept(prefix: bytes) -> bool:
    return prefix[: len(MAGIC)] == MAGIC


Image.register_open(CrashImageFile.format, CrashImageFile, _accept)
