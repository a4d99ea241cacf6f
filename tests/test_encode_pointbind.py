"""Point-Bind's point branch: Point-BERT trunk -> pc_projection -> point head -> unit F_M.

Sources read (the stored copies of public repositories; no oracle package exists on PyPI):

- OpenGVLab/LLaMA-Adapter ``imagebind_LLM/ImageBind/models/imagebind_model.py`` (commit
  734aac2): the model ``imagebind_w3D.pth`` is loaded into, with ``load_state_dict`` (strict by
  default). It adds ``self.point_trunk = PointTransformerBind()``,
  ``modality_heads["point"] = Sequential(LayerNorm(512, eps=1e-6), Dropout(0.5),
  Linear(512, out_embed_dim, bias=False))`` and ``modality_postprocessors["point"] =
  Sequential(Normalize(dim=-1), LearnableLogitScaling(logit_scale_init=1.0,
  learnable=False))``, and downloads the file from huggingface.co/ZiyuG/ImageBind_w3D.
- the same repository's ``models/pointbert/point_encoder.py`` (``PointTransformer``,
  ``PointTransformerBind`` with ``pc_projection = Parameter(empty(768, 512))``) and ``dvae.py``
  (``Group``: FPS + ``knn_point``; ``Encoder``: the mini-PointNet), and ZiyuGuo99/Point-Bind_
  Point-LLM's ``models/pointbert/PointTransformer_8192point.yaml`` (trans_dim 384, depth 12,
  num_heads 6, group_size 32, num_group 512, encoder_dims 256, npoints 8192) and
  ``models/PointBind_models.py`` (the same trunk/projection/head chain).

Verified here against that text: every key name and shape of the point branch (the huge layout
below is written out by hand from those sources), the composition of the forward pass (an
independent functional re-implementation from the reference text, ``reference_forward``,
agrees with the module), and the split of a w3D-layout file into its ImageBind and point parts.

Not verifiable here: the real ``imagebind_w3D.pth`` (no download is possible, and no hash or
size is published), so the key list is inferred from the code that loads it, not read from the
file; and the reference's FPS starts from a random point (``torch.randint``) where ours starts
from point 0 (as Point-BERT's original CUDA kernel does), so the reference itself is not
reproducible call to call.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cachebind.config import EncoderConfig, WeightsConfig
from cachebind.encode import Encoder, build_model
from cachebind.encode.pointbind import (
    PRESETS,
    PointBindConfig,
    PointBindModel,
    build_pointbind,
    load_encoder_checkpoint,
    split_w3d_state,
    w3d_state_dict,
)
from cachebind.encode.pointcloud_ops import Group, farthest_point_sample, knn_indices
from cachebind.errors import InputError, WeightsError
from cachebind.modalities import Modality

IMAGEBIND_HUGE_KEYS = 1311  # docs/REFERENCE.md, ImageBind facts


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (BatchNorm statistics included), so a wiring error shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            # log_logit_scale is a fixed buffer (log 1 = 0) in the reference: left as is.
            if t.is_floating_point() and not name.endswith("log_logit_scale"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model


# --------------------------------------------------------------------------- FPS and grouping


def test_fps_on_a_line_starts_at_point_zero_and_takes_the_farthest_each_time():
    line = torch.zeros(1, 11, 3)
    line[0, :, 0] = torch.arange(11.0)
    # 0, then 10 (farthest), then 5 (midway), then the tie 2/3/7/8 at distance 2 -> lowest
    # index 2, then 7 (the only point still 2 away).
    assert farthest_point_sample(line, 5).tolist() == [[0, 10, 5, 2, 7]]


def test_fps_picks_the_cube_corners_before_any_interior_point_and_is_batched():
    g = torch.Generator().manual_seed(0)
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]).float()
    interior = (torch.rand(40, 3, generator=g) - 0.5) * 0.2
    cloud = torch.cat([interior, corners])  # point 0 is interior: the start
    perm = torch.randperm(48, generator=g)
    perm = torch.cat([torch.tensor([0]), perm[perm != 0]])  # a shuffled copy, same start
    batch = torch.stack([cloud, cloud[perm]])
    idx = farthest_point_sample(batch, 9)
    assert idx[0, 0] == 0 and set(idx[0, 1:].tolist()) == set(range(40, 48))
    assert set(perm[idx[1]].tolist()) == set(idx[0].tolist())


def test_fps_refuses_more_samples_than_points():
    with pytest.raises(ValueError, match="cannot pick"):
        farthest_point_sample(torch.randn(1, 4, 3), 5)


def test_knn_groups_are_the_nearest_points_relative_to_their_centre():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 3, generator=g) * 0.1 + torch.tensor([5.0, 0, 0])
    b = torch.randn(16, 3, generator=g) * 0.1 - torch.tensor([5.0, 0, 0])
    xyz = torch.cat([a, b]).unsqueeze(0)
    neighborhood, center = Group(num_group=2, group_size=16)(xyz)
    assert neighborhood.shape == (1, 2, 16, 3) and center.shape == (1, 2, 3)
    # FPS: point 0 (cluster a) then the farthest point, in cluster b.
    assert torch.equal(center[0, 0], xyz[0, 0])
    absolute = neighborhood + center.unsqueeze(2)
    rows = lambda t: t[t[:, 0].argsort()]  # noqa: E731  (x coordinates are distinct)
    torch.testing.assert_close(rows(absolute[0, 0]), rows(a))
    torch.testing.assert_close(rows(absolute[0, 1]), rows(b))
    # The centre is its own nearest neighbour: offset zero, first.
    assert torch.equal(neighborhood[0, :, 0], torch.zeros(2, 3))


def test_knn_matches_brute_force_distances():
    g = torch.Generator().manual_seed(2)
    xyz, centres = torch.randn(2, 50, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    idx = knn_indices(xyz, centres, 5)
    d = ((centres[:, :, None] - xyz[:, None]) ** 2).sum(-1)
    expected = d.sort(dim=-1).indices[..., :5]
    assert torch.equal(idx, expected)


# --------------------------------------------------------------------------- layout


def _huge_point_layout() -> dict[str, tuple[int, ...]]:
    """The point keys of imagebind_w3D.pth, written out from the reference sources (module
    docstring): trans_dim 384, 12 blocks, encoder_dims 256, mini-PointNet 3-128-256 / 512-512-256,
    pos MLP 3-128-384, qkv without bias, pc_projection 768x512, head 512 -> 1024."""
    p = "point_trunk.point_encoder."
    layout: dict[str, tuple[int, ...]] = {
        "point_trunk.pc_projection": (768, 512),
        p + "cls_token": (1, 1, 384),
        p + "cls_pos": (1, 1, 384),
        p + "reduce_dim.weight": (384, 256),
        p + "reduce_dim.bias": (384,),
        p + "pos_embed.0.weight": (128, 3),
        p + "pos_embed.0.bias": (128,),
        p + "pos_embed.2.weight": (384, 128),
        p + "pos_embed.2.bias": (384,),
        p + "norm.weight": (384,),
        p + "norm.bias": (384,),
        "modality_heads.point.0.weight": (512,),
        "modality_heads.point.0.bias": (512,),
        "modality_heads.point.2.weight": (1024, 512),
        "modality_postprocessors.point.1.log_logit_scale": (),
    }
    for conv, (cin, hidden, cout) in {
        "first_conv": (3, 128, 256),
        "second_conv": (512, 512, 256),
    }.items():
        e = f"{p}encoder.{conv}."
        layout |= {e + "0.weight": (hidden, cin, 1), e + "0.bias": (hidden,)}
        for stat in ("weight", "bias", "running_mean", "running_var"):
            layout[e + "1." + stat] = (hidden,)
        layout[e + "1.num_batches_tracked"] = ()
        layout |= {e + "3.weight": (cout, hidden, 1), e + "3.bias": (cout,)}
    for i in range(12):
        blk = f"{p}blocks.blocks.{i}."
        layout |= {
            blk + "norm1.weight": (384,),
            blk + "norm1.bias": (384,),
            blk + "attn.qkv.weight": (1152, 384),
            blk + "attn.proj.weight": (384, 384),
            blk + "attn.proj.bias": (384,),
            blk + "norm2.weight": (384,),
            blk + "norm2.bias": (384,),
            blk + "mlp.fc1.weight": (1536, 384),
            blk + "mlp.fc1.bias": (1536,),
            blk + "mlp.fc2.weight": (384, 1536),
            blk + "mlp.fc2.bias": (384,),
        }
    return layout


def test_huge_preset_is_the_reference_yaml():
    cfg = PRESETS["huge"]
    assert (cfg.trans_dim, cfg.depth, cfg.num_heads) == (384, 12, 6)
    assert (cfg.group_size, cfg.num_group, cfg.encoder_dims, cfg.num_points) == (32, 512, 256, 8192)
    assert (cfg.proj_dim, cfg.out_embed_dim, cfg.drop_path_rate) == (512, 1024, 0.1)


def test_huge_point_branch_on_meta_has_exactly_the_reference_keys_and_shapes():
    with torch.device("meta"):
        model = build_pointbind("huge")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _huge_point_layout()
    assert len(expected) == 165
    assert got == expected
    # 22.78M numbers in all (the 1.2B of ImageBind-huge are the rest of the file).
    assert sum(math.prod(s) for s in got.values()) == 22_778_627


def test_the_w3d_layout_is_imagebind_huge_plus_the_point_branch_and_splits_back():
    with torch.device("meta"):
        state = w3d_state_dict(build_model("huge"), build_pointbind("huge"))
    assert len(state) == IMAGEBIND_HUGE_KEYS + 165
    imagebind, point = split_w3d_state(state)
    assert len(imagebind) == IMAGEBIND_HUGE_KEYS and set(point) == set(_huge_point_layout())


# --------------------------------------------------------------------------- forward pass


def reference_forward(state: dict[str, torch.Tensor], cfg: PointBindConfig, pts: torch.Tensor):
    """The reference forward written out functionally from point_encoder.py / dvae.py /
    imagebind_model.py (square_distance + topk kNN, explicit softmax attention with scale
    head_dim^-0.5, pos added before every block, LayerNorm eps 1e-5 in the trunk and 1e-6 in the
    head, concat(cls, max), @ pc_projection, head, normalise, x1)."""
    s = {k.removeprefix("point_trunk.point_encoder."): v for k, v in state.items()}
    b, n, _ = pts.shape
    # Group: FPS (start 0, the deterministic variant) + kNN by squared distance.
    center_idx = farthest_point_sample(pts, cfg.num_group)
    center = torch.stack([pts[i, center_idx[i]] for i in range(b)])
    sq = -2 * center @ pts.transpose(1, 2)
    sq = sq + (center**2).sum(-1, keepdim=True) + (pts**2).sum(-1).unsqueeze(1)
    idx = sq.topk(cfg.group_size, dim=-1, largest=False).indices
    groups = torch.stack([pts[i, idx[i]] for i in range(b)]) - center.unsqueeze(2)
    # Encoder (mini-PointNet) with eval-mode BatchNorm.
    x = groups.reshape(b * cfg.num_group, cfg.group_size, 3).transpose(2, 1)

    def conv_bn(x, pre):
        x = F.conv1d(x, s[pre + "0.weight"], s[pre + "0.bias"])
        x = F.batch_norm(
            x,
            s[pre + "1.running_mean"],
            s[pre + "1.running_var"],
            s[pre + "1.weight"],
            s[pre + "1.bias"],
            False,
            0.0,
            1e-5,
        )
        return F.conv1d(F.relu(x), s[pre + "3.weight"], s[pre + "3.bias"])

    f = conv_bn(x, "encoder.first_conv.")
    f = torch.cat([f.max(dim=2, keepdim=True)[0].expand(-1, -1, cfg.group_size), f], dim=1)
    f = conv_bn(f, "encoder.second_conv.").max(dim=2)[0].reshape(b, cfg.num_group, -1)
    tokens = F.linear(f, s["reduce_dim.weight"], s["reduce_dim.bias"])
    pos = F.linear(
        F.gelu(F.linear(center, s["pos_embed.0.weight"], s["pos_embed.0.bias"])),
        s["pos_embed.2.weight"],
        s["pos_embed.2.bias"],
    )
    x = torch.cat([s["cls_token"].expand(b, -1, -1), tokens], 1)
    pos = torch.cat([s["cls_pos"].expand(b, -1, -1), pos], 1)
    d, h = cfg.trans_dim, cfg.num_heads
    for i in range(cfg.depth):
        p = f"blocks.blocks.{i}."
        x = x + pos
        y = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], 1e-5)
        qkv = (
            F.linear(y, s[p + "attn.qkv.weight"])
            .reshape(b, -1, 3, h, d // h)
            .permute(2, 0, 3, 1, 4)
        )
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1)
        y = (attn @ qkv[2]).transpose(1, 2).reshape(b, -1, d)
        x = x + F.linear(y, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], 1e-5)
        y = F.linear(F.gelu(F.linear(y, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                     s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])  # fmt: skip
        x = x + y
    x = F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"], 1e-5)
    feat = torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1) @ state["point_trunk.pc_projection"]
    feat = F.layer_norm(
        feat, (cfg.proj_dim,), state["modality_heads.point.0.weight"],
        state["modality_heads.point.0.bias"], 1e-6,
    )  # fmt: skip
    out = F.linear(feat, state["modality_heads.point.2.weight"])
    scale = state["modality_postprocessors.point.1.log_logit_scale"].exp()
    return F.normalize(out, dim=-1) * scale


@pytest.fixture(scope="module")
def tiny_point() -> PointBindModel:
    return _randomise(build_pointbind("tiny"), seed=3)  # type: ignore[return-value]


def test_module_forward_equals_the_reference_forward(tiny_point: PointBindModel):
    pts = torch.randn(2, 300, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = tiny_point.encode(pts)
        ref = reference_forward(tiny_point.state_dict(), tiny_point.config, pts)
    assert ours.shape == (2, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(2))  # logit scale 1: unit F_M


def test_encoding_is_deterministic_and_ignores_point_order_and_batch(tiny_point: PointBindModel):
    g = torch.Generator().manual_seed(5)
    pts = torch.randn(1, 256, 3, generator=g)
    perm = torch.cat([torch.tensor([0]), torch.randperm(255, generator=g) + 1])  # same FPS start
    with torch.no_grad():
        one = tiny_point.encode(pts)
        again = tiny_point.encode(pts)
        shuffled = tiny_point.encode(pts[:, perm])
        batched = tiny_point.encode(torch.cat([torch.randn(1, 256, 3, generator=g), pts]))[1:]
    assert torch.equal(one, again)
    torch.testing.assert_close(shuffled, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, one, atol=1e-5, rtol=1e-5)


def test_point_branch_refuses_a_wrong_input_shape(tiny_point: PointBindModel):
    with pytest.raises(ValueError, match=r"\[B, N, 3\]"):
        tiny_point.encode(torch.randn(2, 100, 6))


# --------------------------------------------------------------------------- through the Encoder


@pytest.fixture(scope="module")
def w3d_file(tmp_path_factory: pytest.TempPathFactory, tiny_point: PointBindModel) -> Path:
    """A checkpoint of the imagebind_w3D.pth layout at tiny sizes (random values)."""
    torch.manual_seed(6)
    path = tmp_path_factory.mktemp("weights") / "imagebind_w3D.pth"
    torch.save(w3d_state_dict(build_model("tiny"), tiny_point), path)
    return path


def test_from_config_loads_a_w3d_checkpoint_strictly_and_encodes_points(
    w3d_file: Path, tiny_point: PointBindModel, tmp_path: Path
):
    cfg = EncoderConfig(preset="tiny", checkpoint=w3d_file, device="cpu")
    encoder = Encoder.from_config(cfg, WeightsConfig(dir=tmp_path))
    saved = torch.load(w3d_file, weights_only=True)
    assert encoder.pretrained and encoder.point_model is not None
    for name, tensor in encoder.point_model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    clouds = [np.random.default_rng(i).normal(size=(500 + 100 * i, 3)) for i in range(3)]
    f_m = encoder.embed(Modality.POINT, clouds)
    assert f_m.shape == (3, 64) and f_m.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f_m, axis=1), 1.0, atol=1e-5)
    from cachebind.preprocess import preprocess

    batch = torch.stack([preprocess("point", c) for c in clouds])
    with torch.no_grad():
        direct = tiny_point.encode(batch)
    torch.testing.assert_close(encoder.encode("point", batch), direct, atol=1e-5, rtol=1e-5)
    # The ImageBind side is unaffected: images still encode.
    assert encoder.encode(Modality.IMAGE, torch.randn(1, 3, 224, 224)).shape == (1, 64)


def test_bf16_autocast_keeps_grouping_in_fp32_and_agrees(tiny_point: PointBindModel):
    model = build_model("tiny")
    fp32 = Encoder(model, "cpu", torch.float32, point_model=tiny_point)
    bf16 = Encoder(model, "cpu", torch.bfloat16, point_model=tiny_point)
    pts = torch.randn(2, 1024, 3, generator=torch.Generator().manual_seed(7))
    a, b = fp32.encode(Modality.POINT, pts), bf16.encode(Modality.POINT, pts)
    assert b.dtype == torch.float32
    assert F.cosine_similarity(a, b).min() > 0.98


def test_random_init_encoder_has_a_point_branch_and_a_plain_checkpoint_has_none(tmp_path: Path):
    enc = Encoder.from_config(
        EncoderConfig(preset="tiny", device="cpu"), WeightsConfig(dir=tmp_path)
    )
    assert enc.point_model is not None and enc.point_model.config == PRESETS["tiny"]
    assert enc.encode(Modality.POINT, torch.randn(1, 200, 3)).shape == (1, 64)

    plain = tmp_path / "tiny.pth"
    torch.save(build_model("tiny").state_dict(), plain)
    enc = Encoder.from_config(
        EncoderConfig(preset="tiny", checkpoint=plain, device="cpu"), WeightsConfig(dir=tmp_path)
    )
    assert enc.point_model is None
    with pytest.raises(InputError) as err:
        enc.encode(Modality.POINT, torch.randn(1, 200, 3))
    assert err.value.reason == "unsupported_modality"
    with pytest.raises(WeightsError, match="no point branch"):
        load_encoder_checkpoint(plain, "tiny", require_point=True)


def _broken(w3d_file: Path, tmp_path: Path, edit) -> Path:
    state = torch.load(w3d_file, weights_only=True)
    edit(state)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (
            lambda s: s.pop("point_trunk.point_encoder.blocks.blocks.1.attn.qkv.weight"),
            ["point part", "missing keys (1)", "blocks.blocks.1.attn.qkv.weight"],
        ),
        (
            lambda s: s.__setitem__("point_trunk.point_encoder.attn.qkv.bias", torch.zeros(96)),
            ["point part", "unexpected keys (1)", "point_encoder.attn.qkv.bias"],
        ),
        (
            lambda s: s.__setitem__("point_trunk.pc_projection", torch.zeros(64, 16)),
            ["point part", "shape mismatches (1)", "pc_projection: checkpoint (64, 16)"],
        ),
        (
            lambda s: s.pop("modality_heads.vision.2.weight"),
            ["ImageBind part", "missing keys (1)", "modality_heads.vision.2.weight"],
        ),
    ],
    ids=["missing-point", "unexpected-point", "shape-point", "missing-imagebind"],
)
def test_wrong_keys_are_named_with_the_part_they_belong_to(w3d_file, tmp_path, edit, words):
    path = _broken(w3d_file, tmp_path, edit)
    with pytest.raises(WeightsError) as err:
        load_encoder_checkpoint(path, "tiny")
    for word in words:
        assert word in str(err.value)
    with pytest.raises(WeightsError):  # and through the Encoder
        Encoder.from_config(
            EncoderConfig(preset="tiny", checkpoint=path, device="cpu"), WeightsConfig(dir=tmp_path)
        )


def test_point_head_must_match_imagebind_output_size():
    with pytest.raises(ValueError, match="64-d"):
        Encoder(build_model("tiny"), point_model=build_pointbind("small"))
