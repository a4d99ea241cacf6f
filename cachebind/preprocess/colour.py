"""Embedded ICC profiles -> sRGB, so that the model sees the colours the file means.

ImageBind was trained on sRGB-ish web images and its reference transform ignores profiles: a
Display-P3 phone photo, an AdobeRGB or ProPhoto export then reaches the model with its numbers
read as sRGB (13 levels of 255 off on average for ProPhoto). Here the stored pixels are
converted from the embedded profile to sRGB with LittleCMS (Pillow's ``ImageCms``).

Intent: **relative colorimetric**. Colours inside sRGB's gamut come out exactly as the profile
defines them (the media white maps to sRGB white) and only out-of-gamut ones are clipped. A
perceptual intent would, for profiles that carry perceptual tables (print and CMYK profiles),
compress every colour towards the centre to make room for the out-of-gamut ones, shifting the
in-gamut colours the model should see unchanged; for matrix profiles (P3, AdobeRGB, ProPhoto)
LittleCMS treats both intents alike.

A profile is untrusted bytes. The rule: a profile larger than ``input.max_icc_profile_bytes``
(ignored unparsed), one LittleCMS cannot read, one whose colour space does not fit the image's
mode (an RGB profile on a greyscale image …) or one that names itself sRGB is **ignored**: the
pixels are taken as sRGB, as for an untagged file, and the image is never lost over its
profile. A decoder that crashes natively on a crafted profile costs its own input only (the
sandbox, ``cachebind.sandbox``).
"""

from __future__ import annotations

import functools
import io

from PIL import Image, ImageCms

INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC

_MODES_FOR_SPACE = {
    "RGB": {"RGB": "RGB", "RGBA": "RGBA"},
    "GRAY": {"L": "RGB"},
    "CMYK": {"CMYK": "RGB"},
}
"""Profile colour space -> {image mode it applies to: the mode converted into}."""

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_CMS_ERRORS = (ImageCms.PyCMSError, OSError, ValueError, TypeError, MemoryError)


def to_srgb(img: Image.Image, max_profile_bytes: int) -> Image.Image:
    """``img`` converted from its embedded ICC profile to sRGB, or ``img`` itself when it has
    none or the profile is ignored (module docstring)."""
    icc = img.info.get("icc_profile")
    if not isinstance(icc, bytes) or not icc or len(icc) > max_profile_bytes:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    build = _cached_transform if len(icc) <= _CACHED_PROFILE_BYTES else _transform
    transform = build(icc, img.mode)
    if transform is None:
        return img
    try:
        out = ImageCms.applyTransform(img, transform)
    except _CMS_ERRORS:
        return img
    if out is None:  # applyTransform(inPlace=True) only
        return img
    out.info = {k: v for k, v in img.info.items() if k != "icc_profile"}
    return out


_CACHED_PROFILE_BYTES = 256 * 1024
"""Transforms of profiles up to this size are kept (a collection's photos share a handful of
profiles, each a few KB); larger ones are rebuilt, so the cache never pins much memory."""


def _transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The profile -> sRGB transform for images of ``mode``, or None when it is ignored."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        out_mode = _MODES_FOR_SPACE.get(space, {}).get(mode)
        if out_mode is None or _names_srgb(profile):
            return None
        return ImageCms.buildTransform(profile, _SRGB, mode, out_mode, renderingIntent=INTENT)
    except _CMS_ERRORS:
        return None


_cached_transform = functools.lru_cache(maxsize=16)(_transform)


def _names_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    """A profile that calls itself sRGB: converting would only add rounding (±1 level) to the
    pixels the reference reads unchanged. A mislabelled profile is read as sRGB, as if it
    were not there."""
    try:
        description = ImageCms.getProfileDescription(profile)
    except _CMS_ERRORS:
        return False
    return description.strip().lower().startswith("srgb")
