"""ICC profiles written byte by byte for the colour tests: RGB matrix/curve (v2 "matrix-shaper")
profiles of chosen primaries and tone curve, as cameras and editors embed them.

ImageCms.createProfile makes only sRGB, Lab and XYZ profiles, so the non-sRGB ones are built
here from their published D50 primaries.
"""

from __future__ import annotations

import struct

D50 = (0.9642, 1.0, 0.8249)

SRGB_PRIMARIES = (
    (0.4360747, 0.2225045, 0.0139322),
    (0.3850649, 0.7168786, 0.0971045),
    (0.1430804, 0.0606169, 0.7141733),
)
"""sRGB's red, green and blue in XYZ, adapted to D50 (the values of LittleCMS's built-in)."""
PROPHOTO_PRIMARIES = (
    (0.7976749, 0.2880402, 0.0),
    (0.1351917, 0.7118741, 0.0),
    (0.0313534, 0.0000857, 0.8251),
)
ADOBE_RGB_PRIMARIES = (
    (0.6097559, 0.3111242, 0.0194811),
    (0.2052401, 0.6256560, 0.0608902),
    (0.1492240, 0.0632197, 0.7448387),
)

SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
"""IEC 61966-2-1's tone curve as an ICC parametric curve of type 3 (g, a, b, c, d)."""


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(values: tuple[float, float, float]) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in values)


def _para(curve: tuple[float, ...]) -> bytes:
    if len(curve) == 1:  # a pure power law: function type 0
        return b"para\0\0\0\0" + struct.pack(">HH", 0, 0) + _s15(curve[0])
    return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15(v) for v in curve)


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return (
        b"desc\0\0\0\0"
        + struct.pack(">I", len(ascii_))
        + ascii_
        + struct.pack(">II", 0, 0)  # no Unicode description
        + struct.pack(">HB", 0, 0)
        + b"\0" * 67  # no ScriptCode description
    )


def rgb_profile(
    description: str,
    primaries: tuple[tuple[float, float, float], ...],
    curve: tuple[float, ...] = SRGB_CURVE,
) -> bytes:
    """A display-class RGB profile (ICC v2.1) with these D50 primaries and one tone curve."""
    tags = [
        (b"desc", _desc(description)),
        (b"wtpt", _xyz(D50)),
        (b"rXYZ", _xyz(primaries[0])),
        (b"gXYZ", _xyz(primaries[1])),
        (b"bXYZ", _xyz(primaries[2])),
        (b"rTRC", _para(curve)),
        (b"gTRC", _para(curve)),
        (b"bTRC", _para(curve)),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # perceptual intent
        + b"".join(_s15(v) for v in D50)
        + b"\0" * 48  # creator, profile id, reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def swapped_red_green() -> bytes:
    """sRGB with its red and green primaries exchanged: stored (r, g, b) means sRGB (g, r, b)."""
    r, g, b = SRGB_PRIMARIES
    return rgb_profile("red-green swap", (g, r, b))


def prophoto() -> bytes:
    return rgb_profile("ProPhoto-like", PROPHOTO_PRIMARIES, (1.8,))


def adobe_rgb() -> bytes:
    return rgb_profile("AdobeRGB-like", ADOBE_RGB_PRIMARIES, (563 / 256,))
