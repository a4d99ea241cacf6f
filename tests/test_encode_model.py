"""ImageBindModel is the reference ImageBind in every number and every state-dict name.

The oracle is the official model code (imagebind-unofficial 0.1.1, see tests/oracle.py), built
with the same keyword arguments; weights are copied between the two with ``strict=True``.
"""

from __future__ import annotations

import inspect

import oracle
import pytest
import torch

from cachebind.encode import ImageBindModel, build_model
from cachebind.encode.imagebind import PRESETS, count_parameters

TOL = 1e-5
EOT = 49407

# Small widths and depths but the real input sizes the reference hard-codes. Heads and widths
# differ per modality so that a mixed-up trunk or head cannot go unnoticed.
SMALL = dict(
    out_embed_dim=48,
    vision_embed_dim=64,
    vision_num_blocks=2,
    vision_num_heads=4,
    text_embed_dim=32,
    text_num_blocks=2,
    text_num_heads=2,
    audio_embed_dim=48,
    audio_num_blocks=2,
    audio_num_heads=3,
    depth_embed_dim=32,
    depth_num_blocks=2,
    depth_num_heads=4,
    thermal_embed_dim=40,
    thermal_num_blocks=2,
    thermal_num_heads=5,
    imu_embed_dim=32,
    imu_num_blocks=2,
    imu_num_heads=2,
)


@pytest.fixture(scope="module")
def pair() -> tuple[ImageBindModel, torch.nn.Module]:
    """Ours and the reference with the same weights (reference init copied into ours)."""
    torch.manual_seed(0)
    ref = oracle.reference_model(**SMALL)
    with torch.no_grad():
        # Random init leaves some tensors at exactly 0 or 1 (biases, norms); perturb every
        # tensor so that a swapped or ignored parameter changes the output.
        for t in ref.state_dict().values():
            if t.is_floating_point() and t.ndim > 0 and torch.isfinite(t).all():
                t.add_(0.02 * torch.randn_like(t))
        ref.modality_postprocessors["text"][1].log_logit_scale.fill_(2.9)
    ours = ImageBindModel(**SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, EOT - 1, (batch, 77), generator=g)
    for i in range(batch):  # EOT at different positions, zero padding after it
        end = 3 + 17 * i
        text[i, end] = EOT
        text[i, end + 1 :] = 0
    return {
        "vision": torch.randn(batch, 3, 224, 224, generator=g),
        "text": text,
        "audio": torch.randn(batch, 3, 1, 128, 204, generator=g),
        "depth": torch.randn(batch, 1, 224, 224, generator=g),
        "thermal": torch.randn(batch, 1, 224, 224, generator=g),
        "imu": torch.randn(batch, 6, 2000, generator=g),
    }


def test_constructor_has_the_reference_keywords_and_defaults() -> None:
    ours = inspect.signature(ImageBindModel.__init__).parameters
    ref = inspect.signature(oracle.reference().ImageBindModel.__init__).parameters
    assert list(ours) == list(ref)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in ref.items()}


def test_state_dict_names_and_shapes_equal_the_reference(pair) -> None:
    ours, ref = pair
    ours_layout = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_layout = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_layout == ref_layout
    # And the other direction: our weights load strictly into the reference.
    fresh_ref = oracle.reference_model(**SMALL)
    fresh_ref.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
@pytest.mark.parametrize("modality", ["vision", "text", "audio", "depth", "thermal", "imu"])
def test_outputs_equal_the_reference(pair, modality: str, scale: float) -> None:
    ours, ref = pair
    x = _inputs()[modality]
    if x.is_floating_point():
        x = x * scale  # small inputs make every LayerNorm eps visible in the output
    with torch.no_grad():
        expected = ref({modality: x})[modality]
        got = ours({modality: x})[modality]
    assert got.shape == expected.shape == (2, SMALL["out_embed_dim"])
    assert (got - expected).abs().max().item() <= TOL
    # The two samples differ, so the comparison is not between constants.
    assert (got[0] - got[1]).abs().max().item() > 1e-4


def test_postprocessing_scales_are_the_reference_ones(pair) -> None:
    ours, _ = pair
    with torch.no_grad():
        out = ours(_inputs())
    norms = {m: out[m].norm(dim=-1) for m in out}
    torch.testing.assert_close(norms["vision"], torch.ones(2))
    torch.testing.assert_close(norms["depth"], torch.full((2,), 5.0))
    torch.testing.assert_close(norms["thermal"], torch.full((2,), 10.0))
    torch.testing.assert_close(norms["imu"], torch.full((2,), 5.0))
    torch.testing.assert_close(norms["text"], torch.full((2,), torch.tensor(2.9).exp().item()))
    # Audio is averaged over 3 clips after scaling by 20, so its norm is at most 20.
    assert (norms["audio"] <= 20.0 + 1e-4).all() and (norms["audio"] > 1.0).all()


def test_video_clips_are_encoded_per_clip_and_averaged(pair) -> None:
    ours, ref = pair
    g = torch.Generator().manual_seed(2)
    video = torch.randn(2, 3, 3, 2, 224, 224, generator=g)  # [B, S, C, T, H, W]
    with torch.no_grad():
        expected = ref({"vision": video})["vision"]
        got = ours.encode("vision", video)
        # Five or more dimensions always mean a clip axis, so encode the 6 clips one level down.
        clips = ours.modality_postprocessors["vision"](ours.features("vision", video.flatten(0, 1)))
        per_clip = clips.view(2, 3, -1).mean(1)
    assert (got - expected).abs().max().item() <= TOL
    torch.testing.assert_close(got, per_clip)


def test_folded_image_stem_equals_the_conv3d_on_repeated_frames(pair) -> None:
    ours, _ = pair
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        from_image = ours.encode("vision", x)
        from_two_frames = ours.encode("vision", x[:, :, None].repeat(1, 1, 2, 1, 1)[:, None])
        from_one_frame = ours.encode("vision", x[:, :, None][:, None])
    assert (from_image - from_two_frames).abs().max().item() <= TOL
    assert (from_image - from_one_frame).abs().max().item() <= TOL


def test_other_image_sizes_interpolate_positions_like_the_reference(pair) -> None:
    ours, ref = pair
    x = torch.randn(1, 3, 112, 112)  # 8 x 8 patches instead of 16 x 16
    with torch.no_grad():
        expected = ref({"vision": x})["vision"]
        got = ours.encode("vision", x)
    assert (got - expected).abs().max().item() <= TOL


def test_text_is_causal_and_pooled_at_the_eot_token(pair) -> None:
    ours, _ = pair
    text = _inputs()["text"]
    changed = text.clone()
    changed[:, 60:] = 123  # after every EOT: invisible under the causal mask
    changed[0, 2] = 0  # before EOT: visible
    with torch.no_grad():
        base, after = ours.encode("text", text), ours.encode("text", changed)
    torch.testing.assert_close(base[1], after[1])
    assert (base[0] - after[0]).abs().max() > 1e-4


def test_drop_path_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = ImageBindModel(**{**SMALL, "imu_drop_path": 0.9})
    x = torch.randn(4, 6, 2000)
    with torch.no_grad():
        model.train()
        train_runs = [model.encode("imu", x) for _ in range(2)]
        model.eval()
        eval_runs = [model.encode("imu", x) for _ in range(2)]
    assert not torch.equal(train_runs[0], train_runs[1])
    assert torch.equal(eval_runs[0], eval_runs[1])


def test_bf16_autocast_on_cpu_stays_close_to_fp32(pair) -> None:
    ours, _ = pair
    x = _inputs()["vision"]
    with torch.no_grad():
        full = ours.encode("vision", x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = ours.encode("vision", x)
    assert half.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(full, half).min() > 0.99


def test_huge_preset_has_the_official_checkpoint_layout() -> None:
    with torch.device("meta"):
        huge = build_model("huge")
    ours = {k: tuple(v.shape) for k, v in huge.state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in oracle.reference_huge().state_dict().items()}
    assert ours == ref
    assert len(ours) == 1311
    # imagebind_huge.pth holds 1,200.8M numbers (parameters plus the text mask and the fixed
    # logit scales, which are buffers).
    assert count_parameters(huge) == 1_200_786_990
    assert sum(p.numel() for p in huge.parameters()) == 1_200_781_057
    assert huge.out_embed_dim == 1024
    # ViT-H/14 at 224: ~334 GFLOP per image (docs/REFERENCE.md, anchors).
    assert 330e9 < huge.vision_flops() < 340e9


def test_presets_and_overrides() -> None:
    tiny = build_model("tiny", out_embed_dim=16)
    assert tiny.out_embed_dim == 16 and not tiny.training
    assert PRESETS["huge"]["vision_embed_dim"] == 1280
    with pytest.raises(ValueError, match="unknown ImageBind preset"):
        build_model("gigantic")
    with pytest.raises(KeyError, match="unknown ImageBind modality"):
        tiny.encode("smell", torch.zeros(1, 3))
