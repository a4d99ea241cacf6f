"""The public ``preprocess`` entry point: one shape per modality, and one refusal per class of
bad input, each naming the input (``source``) and a machine-readable reason."""

from __future__ import annotations

import io

import fixtures_media as fm
import numpy as np
import pytest
import torch
from PIL import Image

from cachebind.errors import InputError
from cachebind.modalities import Modality
from cachebind.preprocess import INPUT_SHAPES, PREPROCESS_VERSION, load_image, preprocess

SOURCE = "shard-00017/000123"


def sample_input(modality: Modality):
    return {
        Modality.IMAGE: fm.image_bytes("JPEG", "RGB"),
        Modality.TEXT: "a photo of a dog",
        Modality.AUDIO: fm.audio_bytes("flac", 44100, 2, 2.5),
        Modality.VIDEO: fm.video_bytes("mp4", 2.5, 8),
        Modality.DEPTH: fm.depth_png16_bytes(),
        Modality.THERMAL: fm.thermal_bytes(8),
        Modality.IMU: fm.npy_bytes(fm.imu_array(500)),
        Modality.POINT: fm.npy_bytes(np.random.default_rng(0).normal(size=(500, 3))),
    }[modality]


@pytest.mark.parametrize("modality", list(Modality))
def test_every_modality_has_its_documented_shape_and_dtype(modality):
    x = preprocess(modality, sample_input(modality), source=SOURCE)
    assert tuple(x.shape) == INPUT_SHAPES[modality]
    assert x.dtype == (torch.int64 if modality is Modality.TEXT else torch.float32)
    assert torch.isfinite(x.float()).all()


def test_modality_may_be_given_by_name_and_version_is_a_string():
    assert preprocess("image", sample_input(Modality.IMAGE)).shape == (3, 224, 224)
    assert isinstance(PREPROCESS_VERSION, str) and PREPROCESS_VERSION == "1"


def refused(modality, data, reason, **kwargs) -> InputError:
    with pytest.raises(InputError) as err:
        preprocess(modality, data, source=SOURCE, **kwargs)
    assert err.value.reason == reason, err.value
    assert err.value.source == SOURCE and SOURCE in str(err.value)
    return err.value


@pytest.mark.parametrize("modality", ["image", "audio", "video", "depth", "thermal"])
def test_undecodable(modality):
    refused(modality, fm.garbage(), "undecodable")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_images(fmt):
    raw = fm.image_bytes(fmt, "RGB", size=(320, 240))
    refused("image", fm.truncated(raw, 0.5), "truncated")


def test_truncated_npy():
    refused("imu", fm.truncated(fm.npy_bytes(fm.imu_array(500)), 0.5), "truncated")


@pytest.mark.parametrize("modality", list(Modality))
def test_empty(modality):
    refused(modality, b"", "empty")


def test_empty_text_and_too_short_audio_and_imu():
    refused("text", "   ", "empty")
    refused("audio", fm.encode_audio(fm.tone(0.01, 16000), 16000, "wav"), "empty")
    refused("imu", np.zeros((6, 1), np.float32), "empty")


@pytest.mark.parametrize("modality", ["image", "audio", "video", "depth", "imu"])
def test_too_large(modality):
    refused(modality, sample_input(Modality(modality)), "too_large", max_bytes=100)


def test_decompression_bomb_by_pillow_default_limit():
    raw = fm.bomb_png_bytes(10_000, 10_000)  # 1e8 px > 89,478,485, yet only a few kB
    assert len(raw) < 100_000
    err = refused("image", raw, "decompression_bomb")
    assert "10000" in err.detail


def test_decompression_bomb_by_configured_limit_before_decoding():
    refused(
        "image",
        fm.image_bytes("PNG", "RGB", size=(320, 240)),
        "decompression_bomb",
        max_pixels=50_000,
    )
    refused("image", Image.new("RGB", (400, 400)), "decompression_bomb", max_pixels=50_000)


def test_unsupported_formats():
    refused("depth", fm.image_bytes("PNG", "L"), "unsupported_format")  # 8-bit: no metric scale
    refused("video", fm.audio_bytes("wav", 16000, 1, 1.0), "unsupported_format")
    refused("audio", fm.video_bytes("webm", 1.0), "unsupported_format")
    float_img = Image.fromarray(np.zeros((300, 300), np.float32))
    refused("image", float_img, "unsupported_format")
    refused("nonsense-modality", b"x", "unsupported_format")


def test_wrong_types():
    refused("image", 12345, "wrong_type")
    refused("text", ["a", "list"], "wrong_type")
    refused("audio", Image.new("RGB", (10, 10)), "wrong_type")
    refused("imu", np.array(["a"] * 12).reshape(6, 2), "wrong_type")


def test_wrong_shapes():
    refused("imu", np.zeros((5, 100), np.float32), "wrong_shape")
    refused("imu", np.zeros((6, 10, 2), np.float32), "wrong_shape")
    refused("depth", np.zeros((4, 4, 3), np.float32), "wrong_shape")


def test_missing_file(tmp_path):
    refused("image", tmp_path / "nope.jpg", "not_found")
    refused("audio", str(tmp_path / "nope.wav"), "not_found")


def test_non_finite_imu_values_are_refused():
    arr = fm.imu_array(100)
    arr[2, 50] = np.nan
    refused("imu", arr, "undecodable")


def test_truncated_pillow_files_are_never_patched_up():
    # Pillow's LOAD_TRUNCATED_IMAGES must stay off: a cut JPEG is an error, not a grey image.
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(InputError):
        load_image(fm.truncated(fm.image_bytes("JPEG"), 0.6), SOURCE)


def test_pil_image_input_is_accepted_as_is():
    img = Image.open(io.BytesIO(fm.image_bytes("PNG", "RGBA")))
    assert preprocess("image", img).shape == (3, 224, 224)


def test_overlong_audio_is_too_large():
    from cachebind.preprocess.audio import decode_audio

    with pytest.raises(InputError) as err:
        decode_audio(fm.audio_bytes("wav", 16000, 1, 3.0), SOURCE, max_duration_s=1.0)
    assert err.value.reason == "too_large" and SOURCE in str(err.value)


FUZZ_INPUTS = {
    "image": [fm.image_bytes(f, "RGB", size=(96, 64)) for f in ("JPEG", "PNG", "WEBP", "GIF")],
    "audio": [fm.audio_bytes(f, 22050, 1 if f != "ogg" else 2, 1.0) for f in fm.AUDIO_FORMATS],
    "video": [fm.video_bytes(f, 1.0, 8, (48, 32)) for f in fm.VIDEO_FORMATS],
    "depth": [fm.depth_png16_bytes((96, 64))],
    "imu": [fm.npy_bytes(fm.imu_array(50)), fm.imu_csv_bytes(fm.imu_array(50))],
}


@pytest.mark.parametrize("modality", list(FUZZ_INPUTS))
def test_cut_or_corrupted_files_give_a_tensor_or_an_input_error_never_a_crash(modality):
    rng = np.random.default_rng(0)
    for raw in FUZZ_INPUTS[modality]:
        variants = [fm.truncated(raw, k) for k in (0.05, 0.3, 0.6, 0.9, 0.99)]
        for _ in range(3):
            flipped = np.frombuffer(raw, np.uint8).copy()
            flipped[rng.integers(0, len(raw), size=8)] = rng.integers(0, 256, 8, dtype=np.uint8)
            variants.append(flipped.tobytes())
        for data in variants:
            try:
                x = preprocess(modality, data, source=SOURCE)
            except InputError as e:
                assert SOURCE in str(e) and e.reason
            else:
                assert tuple(x.shape) == INPUT_SHAPES[Modality(modality)]
                assert torch.isfinite(x).all()
