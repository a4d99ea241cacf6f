"""Specification of SPHINX's five views (``embed --view-set sphinx``): the whole image at 224,
then the top-left, top-right, bottom-left and bottom-right quarters of its 448-px resize, each
holding its quadrant, after padding to a square with the CLIP mean colour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cachebind.config import EmbedConfig, load_config
from cachebind.preprocess.image import CLIP_MEAN, CLIP_STD
from cachebind.preprocess.subimages import SPHINX_AUGMENTATION, sphinx_views
from cachebind.preprocess.views import augmentation, trainable_views, view_set_tensors

# Quadrant colours in the order the views are cut: top-left, top-right, bottom-left, bottom-right.
COLOURS = ((230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 10))


def quadrant_image(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    boxes = [(0, 0), (half_w, 0), (0, half_h), (half_w, half_h)]
    for colour, (left, top) in zip(COLOURS, boxes, strict=True):
        img.paste(colour, (left, top, left + half_w, top + half_h))
    return img


def normalised(rgb: tuple[float, ...]) -> torch.Tensor:
    """The CLIP-normalised value of an RGB colour in 0..255: [3]."""
    x = torch.tensor(rgb, dtype=torch.float32) / 255.0
    return (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


# One grey level, normalised: what a bicubic kernel's ringing and float rounding stay under.
LEVEL = 1 / 255 / min(CLIP_STD)


def test_the_five_views_are_the_whole_image_then_the_four_corner_quarters_in_order():
    views = sphinx_views(quadrant_image(448, 448))
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 5
    for colour, quarter in zip(COLOURS, views[1:], strict=True):
        # A 448 image resized to 448 is itself: each quarter is exactly its solid colour.
        assert torch.allclose(quarter, normalised(colour)[:, None, None].expand_as(quarter))
    whole = views[0]
    # The whole view keeps the layout: each 112-px quadrant's inside holds its colour.
    insides = [whole[:, 8:104, 8:104], whole[:, 8:104, 120:216],
               whole[:, 120:216, 8:104], whole[:, 120:216, 120:216]]  # fmt: skip
    for colour, inside in zip(COLOURS, insides, strict=True):
        assert (inside - normalised(colour)[:, None, None]).abs().max() < LEVEL


def test_the_whole_view_is_the_release_interpolation_of_the_image_the_quarters_tile():
    img = Image.effect_noise((300, 300), 60).convert("RGB")  # detail everywhere
    whole, tl, tr, bl, br = sphinx_views(img)
    high = torch.cat([torch.cat([tl, tr], dim=2), torch.cat([bl, br], dim=2)], dim=1)
    assert high.shape == (3, 448, 448)
    expected = F.interpolate(high[None], size=(224, 224), mode="bicubic")[0]
    assert torch.equal(whole, expected)
    assert not torch.equal(tl, tr)  # the quarters are different parts of the image


def test_a_wide_image_is_padded_to_a_square_with_the_mean_colour_before_the_crops():
    # 800 x 400: padded to 800 x 800 (200-px bands above and below), 112 px each at 448.
    views = sphinx_views(quadrant_image(800, 400))
    pad = normalised(tuple(int(c * 255) for c in CLIP_MEAN))[:, None, None]
    top_left, top_right, bottom_left, bottom_right = views[1:]
    for band in (top_left[:, :100], top_right[:, :100]):
        assert (band - pad).abs().max() < LEVEL
    for band in (bottom_left[:, 124:], bottom_right[:, 124:]):
        assert (band - pad).abs().max() < LEVEL
    # Between the band and the quadrants' edge (row 224 of 448), 12 px away from either, an
    # upper quarter holds its quadrant's colour; likewise the lower quarters above their band.
    for colour, inside in zip(
        COLOURS,
        (top_left[:, 124:212, :200], top_right[:, 124:212, 24:],
         bottom_left[:, 12:100, :200], bottom_right[:, 12:100, 24:]),
        strict=True,
    ):  # fmt: skip
        assert (inside - normalised(colour)[:, None, None]).abs().max() < LEVEL


def test_the_view_set_is_recorded_and_training_does_not_draw_quarters_as_the_image():
    assert augmentation("sphinx") == SPHINX_AUGMENTATION
    assert SPHINX_AUGMENTATION["views"] == [
        "whole", "top-left", "top-right", "bottom-left", "bottom-right"
    ]  # fmt: skip
    assert augmentation("random-crop")["transform"] == "RandomResizedCrop"
    assert not trainable_views({"count": 5, "augmentation": augmentation("sphinx")})
    assert trainable_views({"count": 2, "augmentation": augmentation("random-crop")})
    img = quadrant_image(448, 448)
    got = view_set_tensors(img, sid=3, views=5, view_set="sphinx")
    assert all(torch.equal(a, b) for a, b in zip(got, sphinx_views(img), strict=True))


def test_the_sphinx_view_set_needs_five_views_and_the_flag_reaches_the_settings(tmp_path):
    from cachebind.cli import build_parser, overrides_from

    with pytest.raises(ValueError, match="caches 5 views .* give --views 5"):
        EmbedConfig(view_set="sphinx", views=2)
    with pytest.raises(ValueError, match="embed.views is 0"):
        EmbedConfig(view_set="sphinx")
    args = build_parser().parse_args(
        ["embed", str(tmp_path), "--views", "5", "--view-set", "sphinx"]
    )
    embed = load_config(None, **overrides_from(args)).embed
    assert (embed.views, embed.view_set) == (5, "sphinx")
    assert EmbedConfig().view_set == "random-crop"
