"""Encoder: config -> model on a device and dtype, batched encode, F_M via preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cachebind.config import EncoderConfig, WeightsConfig
from cachebind.encode import Encoder, build_model
from cachebind.encode.weights import file_sha256
from cachebind.errors import WeightsError
from cachebind.modalities import Modality
from cachebind.preprocess import PREPROCESS_VERSION, preprocess


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint file of the tiny layout with random values (real names and shapes)."""
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(build_model("tiny").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    cfg = EncoderConfig(preset="tiny", checkpoint=tiny_checkpoint, device="cpu")
    return Encoder.from_config(cfg, WeightsConfig(dir=tmp_path_factory.mktemp("empty")))


def test_from_config_loads_the_checkpoint(encoder: Encoder, tiny_checkpoint: Path) -> None:
    assert encoder.pretrained
    assert encoder.out_dim == 64
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32
    expected = torch.load(tiny_checkpoint, weights_only=True)
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert encoder.identity == {
        "model": "imagebind",
        "preset": "tiny",
        "checkpoint": str(tiny_checkpoint.resolve()),
        "sha256": file_sha256(tiny_checkpoint),
        "weights": f"sha256:{file_sha256(tiny_checkpoint)}",
        "preprocess_version": PREPROCESS_VERSION,
        "out_dim": 64,
    }


def test_encode_matches_the_model_and_returns_float32_on_cpu(
    encoder: Encoder, tiny_checkpoint: Path
) -> None:
    x = torch.randn(3, 3, 224, 224)
    out = encoder.encode(Modality.IMAGE, x)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (3, 64)
    reference = build_model("tiny")
    reference.load_state_dict(torch.load(tiny_checkpoint, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(out, reference.encode("vision", x))
    assert encoder.encode("image", x[:0]).shape == (0, 64)


def test_batching_does_not_change_results(encoder: Encoder) -> None:
    g = torch.Generator().manual_seed(5)
    audio = torch.randn(5, 3, 1, 128, 204, generator=g)
    whole = encoder.encode(Modality.AUDIO, audio)
    encoder.batch_size = 3  # one sample (3 clips) per forward pass
    try:
        pieces = encoder.encode(Modality.AUDIO, audio)
    finally:
        encoder.batch_size = 64
    torch.testing.assert_close(whole, pieces, atol=1e-6, rtol=1e-5)


def test_video_uses_the_vision_trunk_and_averages_clips(encoder: Encoder) -> None:
    frames = torch.randn(1, 3, 2, 224, 224)
    video = frames[:, None].expand(1, 15, 3, 2, 224, 224)  # 15 identical clips
    torch.testing.assert_close(
        encoder.encode(Modality.VIDEO, video),
        encoder.encode(Modality.VIDEO, frames[:, None]),
        atol=1e-6,
        rtol=1e-5,
    )


def test_embed_is_preprocess_then_encode_then_normalise(encoder: Encoder) -> None:
    texts = ["a photo of a dog", "the sound of rain on a tin roof"]
    f_m = encoder.embed(Modality.TEXT, texts)
    assert f_m.dtype == np.float32 and f_m.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(f_m, axis=1), 1.0, rtol=1e-5)
    batch = torch.stack([preprocess(Modality.TEXT, t, source="t") for t in texts])
    expected = torch.nn.functional.normalize(encoder.encode(Modality.TEXT, batch), dim=-1)
    np.testing.assert_allclose(f_m, expected.numpy(), atol=1e-6)

    images = [Image.new("RGB", (320, 240), c) for c in ((200, 30, 30), (20, 90, 220))]
    f_img = encoder.embed(Modality.IMAGE, images)
    assert f_img.shape == (2, 64) and not np.allclose(f_img[0], f_img[1])
    assert encoder.embed(Modality.IMAGE, []).shape == (0, 64)


def test_random_init_is_seeded_and_marked(tmp_path: Path) -> None:
    def make(seed: int) -> Encoder:
        cfg = EncoderConfig(preset="tiny", seed=seed, device="cpu")
        return Encoder.from_config(cfg, WeightsConfig(dir=tmp_path))

    a, b, c = make(0), make(0), make(1)
    assert not a.pretrained
    assert a.identity["weights"] == "random-init:seed=0" and a.identity["checkpoint"] is None
    x = torch.randn(2, 6, 2000)
    torch.testing.assert_close(a.encode(Modality.IMU, x), b.encode(Modality.IMU, x))
    assert not torch.allclose(a.encode(Modality.IMU, x), c.encode(Modality.IMU, x))


def test_a_checkpoint_of_another_layout_names_the_keys(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    state = torch.load(tiny_checkpoint, weights_only=True)
    del state["modality_preprocessors.text.mask"]
    state["modality_trunks.text.pre_transformer_layer.0.weight"] = torch.ones(64)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    cfg = EncoderConfig(preset="tiny", checkpoint=bad, device="cpu")
    with pytest.raises(WeightsError) as info:
        Encoder.from_config(cfg, WeightsConfig(dir=tmp_path))
    assert "missing keys (1): modality_preprocessors.text.mask" in str(info.value)
    assert "unexpected keys (1): modality_trunks.text.pre_transformer_layer.0.weight" in str(
        info.value
    )


def test_huge_uses_the_downloaded_file_in_the_weights_dir(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    # A tiny-layout file under the official name proves the default path is read (and checked).
    (tmp_path / "imagebind_huge.pth").write_bytes(tiny_checkpoint.read_bytes())
    with pytest.raises(WeightsError, match="shape mismatches") as info:
        Encoder.from_config(EncoderConfig(preset="huge", device="cpu"), WeightsConfig(dir=tmp_path))
    assert "imagebind_huge.pth" in str(info.value)


def test_a_configured_checkpoint_must_exist(tmp_path: Path) -> None:
    cfg = EncoderConfig(preset="tiny", checkpoint=tmp_path / "nope.pth", device="cpu")
    with pytest.raises(WeightsError, match="not found"):
        Encoder.from_config(cfg, WeightsConfig(dir=tmp_path))


def test_bf16_on_cpu_stays_close_to_fp32(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def make(dtype: str) -> Encoder:
        cfg = EncoderConfig(preset="tiny", checkpoint=tiny_checkpoint, device="cpu", dtype=dtype)
        return Encoder.from_config(cfg, WeightsConfig(dir=tmp_path))

    x = torch.randn(2, 3, 224, 224)
    full, half = make("float32"), make("bfloat16")
    assert half.dtype == torch.bfloat16
    out = half.encode(Modality.IMAGE, x)
    assert out.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(full.encode(Modality.IMAGE, x), out)
    assert cos.min() > 0.99


def test_a_file_of_the_official_huge_layout_loads_from_the_weights_dir(tmp_path: Path) -> None:
    """Every one of the 1311 names and shapes of imagebind_huge.pth, stored as stride-0 views of
    one number each (a few hundred KB instead of 4.8 GB), loads strictly through from_config."""
    with torch.device("meta"):
        layout = {k: v.shape for k, v in build_model("huge").state_dict().items()}
    state = {k: torch.full((1,) * len(s), 0.5).expand(s) for k, s in layout.items()}
    path = tmp_path / "imagebind_huge.pth"
    torch.save(state, path)
    assert path.stat().st_size < 2_000_000

    encoder = Encoder.from_config(
        EncoderConfig(preset="huge", device="cpu"), WeightsConfig(dir=tmp_path)
    )
    assert encoder.pretrained and encoder.out_dim == 1024
    assert encoder.identity["preset"] == "huge"
    assert encoder.identity["checkpoint"] == str(path.resolve())
    loaded = encoder.model.state_dict()
    assert len(loaded) == 1311
    assert {k: v.shape for k, v in loaded.items()} == layout
    # The model holds the file's tensors (one number each), not random or meta ones.
    assert all(not t.is_meta and t[(0,) * t.ndim].item() == 0.5 for t in loaded.values())
    assert all(t.untyped_storage().nbytes() == 4 for t in loaded.values())


def test_a_half_precision_checkpoint_is_loaded_as_fp32(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    state = torch.load(tiny_checkpoint, weights_only=True)
    half = tmp_path / "half.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, half)
    cfg = EncoderConfig(preset="tiny", checkpoint=half, device="cpu")
    encoder = Encoder.from_config(cfg, WeightsConfig(dir=tmp_path))
    assert all(t.dtype == torch.float32 for t in encoder.model.state_dict().values())
    out = encoder.encode(Modality.DEPTH, torch.rand(2, 1, 224, 224))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
