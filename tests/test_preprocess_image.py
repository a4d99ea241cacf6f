"""Image preprocessing: ImageBind's Resize(224, BICUBIC) -> CenterCrop(224) -> ToTensor ->
Normalize(CLIP), on every common format and Pillow mode."""

from __future__ import annotations

import io

import fixtures_media as fm
import numpy as np
import pytest
import torch
from PIL import Image

from cachebind.preprocess import preprocess
from cachebind.preprocess.common import center_crop_box, resize_size
from cachebind.preprocess.image import CLIP_MEAN, CLIP_STD, image_tensor, load_image

MEAN = torch.tensor(CLIP_MEAN)[:, None, None]
STD = torch.tensor(CLIP_STD)[:, None, None]


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """The model input value of an RGB colour (ToTensor then Normalize)."""
    return (torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255.0 - MEAN) / STD


@pytest.mark.parametrize("color", [(0, 0, 0), (255, 255, 255), (12, 200, 77)])
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (50, 40)])
def test_constant_image_gives_its_normalised_colour_everywhere(color, size):
    x = preprocess("image", fm.constant_image_bytes(color, size))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, normalised(color).expand(3, 224, 224), atol=1e-6, rtol=0)


def test_resize_follows_torchvision_short_side_rule():
    # short side -> 224, long side truncated (never rounded up): int(224 * long / short)
    assert resize_size(300, 200) == (336, 224)
    assert resize_size(200, 300) == (224, 336)
    assert resize_size(1000, 225) == (995, 224)  # 224*1000/225 = 995.56 -> 995
    assert resize_size(224, 224) == (224, 224)


def test_center_crop_uses_python_round_like_torchvision():
    assert center_crop_box(300, 224) == (38, 0, 262, 224)
    assert center_crop_box(301, 224) == (38, 0, 262, 224)  # round(38.5) = 38 (half to even)
    assert center_crop_box(303, 224) == (40, 0, 264, 224)  # round(39.5) = 40
    assert center_crop_box(224, 337) == (0, 56, 224, 280)


def test_crop_takes_the_centre_columns_without_resampling_when_short_side_is_224():
    # Red channel = column index: after a no-op resize the crop must start at column 38.
    w, h = 301, 224
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = (np.arange(w) % 256)[None, :]
    x = image_tensor(Image.fromarray(arr, "RGB"))
    red = x[0] * CLIP_STD[0] + CLIP_MEAN[0]
    cols = torch.round(red[0] * 255).to(torch.int64)
    assert cols[0].item() == 38 and cols[-1].item() == (38 + 223) % 256


def test_matches_pillow_bicubic_pipeline_on_a_textured_image():
    arr = fm.pattern_rgb(500, 333, seed=3)
    img = Image.fromarray(arr, "RGB")
    expected = img.resize((336, 224), Image.Resampling.BICUBIC).crop((56, 0, 280, 224))
    ref = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(image_tensor(img), (ref - MEAN) / STD, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
        ("PNG", "RGB"),
        ("PNG", "L"),
        ("PNG", "LA"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("PNG", "P+transparency"),
        ("PNG", "I;16"),
        ("WEBP", "RGB"),
        ("WEBP", "RGBA"),
        ("GIF", "P"),
        ("GIF", "L"),
    ],
)
def test_every_format_and_mode_gives_a_finite_rgb_input(fmt, mode):
    x = preprocess("image", fm.image_bytes(fmt, mode), source=f"{fmt}-{mode}")
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_composited_on_white(mode):
    img = load_image(fm.image_bytes("PNG", mode, size=(448, 224)))
    arr = np.asarray(img)
    assert img.mode == "RGB"
    assert (arr[:, :224] == 255).all()  # the fully transparent left half
    assert (arr[:, 224:] != 255).any()


def test_palette_transparency_is_composited_on_white():
    raw = fm.image_bytes("PNG", "P+transparency", size=(64, 64))
    src = Image.open(io.BytesIO(raw))
    transparent = np.asarray(src) == 0
    assert transparent.any()
    arr = np.asarray(load_image(raw))
    assert (arr[transparent] == 255).all()


def test_gif_uses_its_first_frame():
    x = preprocess("image", fm.animated_gif_bytes(frames=3))
    torch.testing.assert_close(x, normalised((40, 40, 40)).expand(3, 224, 224), atol=1e-6, rtol=0)


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped():
    grey = np.full((230, 230), 200 * 257, np.uint16)  # 16-bit 51400 -> 8-bit 200
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    x = preprocess("image", buf.getvalue())
    expected = normalised((200, 200, 200)).expand(3, 224, 224)
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_exif_orientation_is_applied():
    img = Image.fromarray(fm.pattern_rgb(320, 200), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (200, 320)


def test_bytes_path_and_pil_inputs_agree(tmp_path):
    raw = fm.image_bytes("PNG", "RGB", size=(400, 300), seed=5)
    path = fm.write(tmp_path / "a.png", raw)
    from_bytes = preprocess("image", raw)
    torch.testing.assert_close(preprocess("image", path), from_bytes, atol=0, rtol=0)
    torch.testing.assert_close(preprocess("image", str(path)), from_bytes, atol=0, rtol=0)
    pil = Image.open(io.BytesIO(raw))
    torch.testing.assert_close(preprocess("image", pil), from_bytes, atol=0, rtol=0)
