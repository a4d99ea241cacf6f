"""A video stream's display matrix -> the frame turned (and mirrored) as players show it.

Phones record in the sensor's landscape orientation and store how to show it in the stream's
display matrix (MP4/MOV ``tkhd``, Matroska projection; FFmpeg's ``AV_FRAME_DATA_DISPLAYMATRIX``
side data, PyAV's ``frame.rotation``). ImageBind's reference decoder ignores it, so a portrait
video would be embedded lying on its side; images already honour EXIF orientation.

The matrix is read as FFmpeg defines it (``libavutil/display.h``): a source pixel ``(p, q)``
goes to ``(a p + c q, b p + d q)`` (plus a translation that only moves the result into view).
Quarter turns and mirrors are applied exactly; a matrix of any other angle is taken to its
nearest quarter turn (no resampling, no fill), and one that is not readable is ignored.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

Matrix = tuple[int, int, int, int]
"""The display matrix's ``a, b, c, d`` (16.16 fixed point), the part that turns and mirrors."""

_IDENTITY: Matrix = (1 << 16, 0, 0, 1 << 16)


def display_matrix(frame: Any) -> Matrix | None:
    """The ``a, b, c, d`` of a decoded PyAV frame's display matrix, or None without one (or
    with one that is the identity or unreadable)."""
    try:
        entries = [sd for sd in frame.side_data if "DISPLAYMATRIX" in str(sd.type)]
        if not entries:
            return None
        raw = bytes(entries[0])
        if len(raw) < 36:
            return None
        a, b, _, c, d = struct.unpack_from("<5i", raw)
    except (AttributeError, TypeError, ValueError, struct.error):
        return None
    matrix = (a, b, c, d)
    return None if matrix == _IDENTITY or not any(matrix) else matrix


def orient(pixels: np.ndarray, matrix: Matrix | None) -> np.ndarray:
    """``pixels`` [H, W, ...] as shown: transposed when the matrix swaps the axes, then each
    axis mirrored where the matrix reverses it (a view, no copy)."""
    if matrix is None:
        return pixels
    a, b, c, d = matrix
    if abs(a) + abs(d) >= abs(b) + abs(c):  # p' follows p, q' follows q
        flip_x, flip_y = a < 0, d < 0
    else:  # p' follows q and q' follows p: the axes swap
        pixels = np.swapaxes(pixels, 0, 1)
        flip_x, flip_y = c < 0, b < 0
    if flip_x:
        pixels = pixels[:, ::-1]
    if flip_y:
        pixels = pixels[::-1]
    return pixels
