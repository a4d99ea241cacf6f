"""Embedded ICC profiles: the model sees the colours the file means (converted to sRGB), and a
profile is untrusted bytes that never loses an image."""

from __future__ import annotations

import io

import colour_profiles as icc
import fixtures_media as fm
import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from cachebind.config import InputLimits
from cachebind.preprocess import preprocess
from cachebind.preprocess.colour import INTENT
from cachebind.preprocess.image import CLIP_STD

LEVEL = 1 / 255 / min(CLIP_STD)
"""One level of 255 in the model input's units (the largest, on the channel of smallest std)."""
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def tagged(profile: bytes, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A photo-like image stored with ``profile`` embedded (its pixels unchanged)."""
    img = Image.open(io.BytesIO(fm.image_bytes("TIFF", mode, size=(320, 240), seed=3)))
    out = io.BytesIO()
    img.save(out, fmt, icc_profile=profile, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def stored_pixels(raw: bytes) -> Image.Image:
    """The pixels as the file stores them (no profile applied), as RGB."""
    return Image.open(io.BytesIO(raw)).convert("RGB")


def png(img: Image.Image) -> bytes:
    """``img`` as an untagged PNG (Pillow would carry over a profile left in ``img.info``)."""
    out = io.BytesIO()
    img.save(out, "PNG", icc_profile=None)
    return out.getvalue()


def levels_apart(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean, max) absolute difference of two model inputs, in levels of 255."""
    diff = (a - b).abs() / LEVEL
    return float(diff.mean()), float(diff.max())


def test_a_profile_swapping_red_and_green_reaches_the_model_as_the_swapped_colours():
    raw = tagged(icc.swapped_red_green())
    r, g, b = stored_pixels(raw).split()
    expected = preprocess("image", png(Image.merge("RGB", (g, r, b))))
    mean, worst = levels_apart(preprocess("image", raw), expected)
    # Only LittleCMS's rounding separates the two (its sRGB and ours are the same primaries to
    # the 16-bit fixed point an ICC file holds).
    assert mean < 0.5 and worst <= 2.0
    untagged_mean, _ = levels_apart(preprocess("image", png(stored_pixels(raw))), expected)
    assert untagged_mean > 10  # the profile matters: read as sRGB, the input is far off


@pytest.mark.parametrize("profile", [icc.prophoto(), icc.adobe_rgb()], ids=["prophoto", "adobe"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_wide_gamut_photo_matches_its_srgb_conversion_in_the_model_input(profile, fmt):
    raw = tagged(profile, fmt)
    stored = stored_pixels(raw)
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    converted = ImageCms.profileToProfile(stored, source, SRGB, renderingIntent=INTENT)
    mean, worst = levels_apart(preprocess("image", raw), preprocess("image", png(converted)))
    assert mean < 0.25 and worst <= 1.0
    as_srgb, _ = levels_apart(preprocess("image", png(stored)), preprocess("image", raw))
    assert as_srgb > 1.5  # read as sRGB it would be several levels off


def test_the_setting_off_reads_the_stored_pixels_byte_for_byte():
    raw = tagged(icc.swapped_red_green())
    off = InputLimits(honour_pixel_metadata=False)
    stored = preprocess("image", png(stored_pixels(raw)))
    assert torch.equal(preprocess("image", raw, limits=off), stored)


def test_an_srgb_tagged_image_is_read_unchanged():
    raw = tagged(SRGB.tobytes(), "PNG")
    assert torch.equal(preprocess("image", raw), preprocess("image", png(stored_pixels(raw))))


def test_a_grey_image_with_a_swapping_rgb_profile_ignores_the_profile_that_does_not_fit():
    raw = tagged(icc.swapped_red_green(), "PNG", mode="L")
    assert torch.equal(preprocess("image", raw), preprocess("image", png(stored_pixels(raw))))


def test_a_transparent_image_keeps_its_alpha_through_the_conversion():
    raw = tagged(icc.swapped_red_green(), "PNG", mode="RGBA")
    x = preprocess("image", raw)
    # The transparent left half composites to white whatever the profile says.
    white = (1.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 100, 10], white, atol=LEVEL, rtol=0)


HOSTILE_PROFILES = {
    "garbage": fm.garbage(3000, seed=1),
    "cut_in_half": icc.prophoto()[: len(icc.prophoto()) // 2],
    "header_only": icc.prophoto()[:128],
    "tag_past_the_end": icc.prophoto()[:132] + b"rXYZ\x7f\xff\xff\xff\x00\x00\x00\x14",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PROFILES))
def test_a_malformed_profile_is_ignored_and_the_image_is_read_as_srgb(name):
    raw = tagged(HOSTILE_PROFILES[name])
    assert torch.equal(preprocess("image", raw), preprocess("image", png(stored_pixels(raw))))


def test_a_profile_over_the_budget_is_ignored_unparsed():
    profile = icc.swapped_red_green()
    raw = tagged(profile)
    small = InputLimits(max_icc_profile_bytes=len(profile) - 1)
    assert torch.equal(
        preprocess("image", raw, limits=small), preprocess("image", png(stored_pixels(raw)))
    )
    # At its size it is honoured (the budget, not the profile, made the difference).
    honoured = preprocess("image", raw, limits=InputLimits(max_icc_profile_bytes=len(profile)))
    assert levels_apart(honoured, preprocess("image", png(stored_pixels(raw))))[0] > 10


def test_a_cmyk_jpeg_with_a_profile_it_cannot_use_still_decodes():
    raw = tagged(icc.swapped_red_green(), "JPEG", mode="CMYK")
    assert preprocess("image", raw).shape == (3, 224, 224)


def test_a_large_profile_of_repeated_tags_costs_one_image_not_the_process():
    # 3 MB of profile (under the budget): a JPEG carries it in ~50 APP2 segments.
    profile = icc.swapped_red_green()
    big = profile + b"\0" * (3 * 2**20)
    big = len(big).to_bytes(4, "big") + big[4:]
    raw = tagged(big)
    x = preprocess("image", raw)
    assert torch.isfinite(x).all() and x.shape == (3, 224, 224)
    assert np.isfinite(x.numpy()).all()


def test_a_png_whose_profile_inflates_past_pillows_limit_is_read_without_it():
    # Pillow refuses a PNG whose iCCP chunk inflates past 1 MiB; 5 MiB of zeros is a few KB.
    profile = icc.swapped_red_green() + bytes(5 * 2**20)
    raw = tagged(len(profile).to_bytes(4, "big") + profile[4:], "PNG")
    assert len(raw) < 2**20
    untagged = tagged(b"", "PNG")  # the same pixels, no profile
    assert torch.equal(preprocess("image", raw), preprocess("image", untagged))


def test_a_png_with_a_text_chunk_past_pillows_limit_is_read_without_it():
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * (3 * 2**20), zip=True)
    img = Image.fromarray(fm.pattern_rgb(64, 48, seed=1), "RGB")
    out = io.BytesIO()
    img.save(out, "PNG", pnginfo=text)
    assert torch.equal(preprocess("image", out.getvalue()), preprocess("image", png(img)))
