"""Point-Bind (Guo et al., 2023): 3D point clouds in ImageBind's embedding space.

A Point-BERT trunk (``PointTransformer``) turns a cloud ``[B, N, 3]`` into ``[B, 768]`` (CLS
token and max-pooled patch tokens), ``pc_projection`` ``[768, 512]`` maps it to 512-d, and an
ImageBind-style head (LayerNorm -> Dropout -> Linear without bias) projects it to ImageBind's
1024-d space; the postprocessor L2-normalises with a fixed logit scale of 1, so F_M for a point
cloud is a unit vector like a vision embedding.

State-dict layout (that of ``imagebind_w3D.pth``, the file LLaMA-Adapter's
``imagebind_LLM/ImageBind/models/imagebind_model.py`` loads with ``load_state_dict`` strict into
an ``ImageBindModel`` that owns ``point_trunk = PointTransformerBind()``)::

    point_trunk.point_encoder.{cls_token, cls_pos, encoder.*, reduce_dim.*, pos_embed.*,
                               blocks.blocks.<i>.*, norm.*}
    point_trunk.pc_projection                              [768, 512]
    modality_heads.point.{0.weight, 0.bias, 2.weight}      LayerNorm(512), Linear(512 -> 1024)
    modality_postprocessors.point.1.log_logit_scale        buffer, log(1.0) = 0

``PointBindModel`` produces exactly these keys, so the point part of the file loads into it with
``strict=True`` unchanged; every other key of the file is the ImageBind-huge layout
(``split_w3d_state``). The trunk sizes come from ``PointTransformer_8192point.yaml``
(trans_dim 384, depth 12, num_heads 6, group_size 32, num_group 512, encoder_dims 256,
npoints 8192).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from cachebind.encode.heads import LogitScale, Normalize
from cachebind.encode.imagebind import ImageBindModel, build_model
from cachebind.encode.pointcloud_ops import Group
from cachebind.encode.transformer import TRUNK_LN_EPS, DropPath, Mlp
from cachebind.encode.weights import check_layout, read_state_dict
from cachebind.errors import WeightsError

W3D_URL = (
    "https://huggingface.co/ZiyuG/ImageBind_w3D/resolve/"
    "e9206a10f118b0790c730264e7b3aa5c324c35cb/imagebind_w3D.pth"
)
"""Where LLaMA-Adapter's ``imagebind_huge(pretrained=True)`` downloads ``imagebind_w3D.pth``
(no published hash or size: ``download_weights("imagebind_w3D", dest_dir=..., url=W3D_URL,
filename="imagebind_w3D.pth")`` downloads it unverified)."""

POINT_PREFIXES = ("point_trunk.", "modality_heads.point.", "modality_postprocessors.point.")
"""Key prefixes of ``imagebind_w3D.pth`` that belong to the point branch."""

POINT_LOGIT_SCALE = 1.0  # LearnableLogitScaling(logit_scale_init=1.0, learnable=False)


@dataclass(frozen=True)
class PointBindConfig:
    """Sizes of the point branch. ``huge`` is Point-Bind's; the others are for tests and demos.

    ``pointnet_dims`` are the mini-PointNet widths (first conv hidden, first conv out, second
    conv hidden), ``(128, 256, 512)`` in the reference; ``pos_hidden`` the hidden width of the
    positional MLP (128); ``proj_dim`` the width of ``pc_projection`` and the head's LayerNorm
    (512); ``out_embed_dim`` ImageBind's output size.
    """

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    group_size: int = 32
    num_group: int = 512
    encoder_dims: int = 256
    drop_path_rate: float = 0.1
    pointnet_dims: tuple[int, int, int] = (128, 256, 512)
    pos_hidden: int = 128
    proj_dim: int = 512
    out_embed_dim: int = 1024
    num_points: int = 8192


PRESETS: dict[str, PointBindConfig] = {
    "huge": PointBindConfig(),
    # Same output size as ImageBind's "small" preset (1024-d), a fraction of the trunk.
    "small": PointBindConfig(
        trans_dim=128,
        depth=2,
        num_heads=4,
        group_size=16,
        num_group=64,
        encoder_dims=128,
        pointnet_dims=(64, 128, 256),
        pos_hidden=64,
        proj_dim=256,
    ),
    # Output size of ImageBind's "tiny" preset (64-d): fast tests.
    "tiny": PointBindConfig(
        trans_dim=32,
        depth=2,
        num_heads=4,
        group_size=8,
        num_group=16,
        encoder_dims=32,
        pointnet_dims=(16, 32, 64),
        pos_hidden=16,
        proj_dim=32,
        out_embed_dim=64,
    ),
}


# --------------------------------------------------------------------------- Point-BERT trunk


class MiniPointNet(nn.Module):
    """Patch embedding (reference ``Encoder`` in ``dvae.py``): ``[B, G, M, 3] -> [B, G, C]``.

    Shared pointwise MLP, max-pool over the patch, concatenate that global feature to every
    point, a second pointwise MLP, max-pool again. BatchNorm runs on its running statistics in
    eval mode.
    """

    def __init__(self, encoder_channel: int, dims: tuple[int, int, int] = (128, 256, 512)) -> None:
        super().__init__()
        c1, c2, c3 = dims
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, c1, 1), nn.BatchNorm1d(c1), nn.ReLU(inplace=True), nn.Conv1d(c1, c2, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * c2, c3, 1),
            nn.BatchNorm1d(c3),
            nn.ReLU(inplace=True),
            nn.Conv1d(c3, encoder_channel, 1),
        )

    def forward(self, groups: Tensor) -> Tensor:
        b, g, m, _ = groups.shape
        x = self.first_conv(groups.reshape(b * g, m, 3).transpose(1, 2))  # [BG, c2, M]
        pooled = x.amax(dim=2, keepdim=True)
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, m), x], dim=1))
        return x.amax(dim=2).reshape(b, g, self.encoder_channel)


class PointAttention(nn.Module):
    """timm-style attention (reference names ``qkv`` without bias, ``proj``), computed with
    ``scaled_dot_product_attention`` (scale head_dim^-0.5, as the reference)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"trans_dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class PointBlock(nn.Module):
    """Pre-norm block with Point-BERT's names (``norm1``, ``attn``, ``norm2``, ``mlp``).

    ImageBind's ``transformer.Block`` cannot be reused as is: its names (``norm_1``,
    ``attn.in_proj_weight``), its LayerNorm eps (1e-6 vs torch's 1e-5 here) and its qkv bias
    differ from Point-BERT's. Its ``Mlp`` (``fc1``/GELU/``fc2``) and ``DropPath`` are the same
    and are reused.
    """

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.attn = PointAttention(dim, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PointTransformerEncoder(nn.Module):
    """Reference ``TransformerEncoder``: the positional embedding is added before *every* block."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path_rate: float) -> None:
        super().__init__()
        # The reference's torch.linspace(0, rate, depth), in Python (works on the meta device).
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([PointBlock(dim, num_heads, rates[i]) for i in range(depth)])

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointTransformer(nn.Module):
    """Point-BERT's ``PointTransformer``: ``[B, N, 3] -> [B, 2 * trans_dim]``.

    Group (FPS + kNN) -> mini-PointNet per patch -> ``reduce_dim`` -> prepend the CLS token ->
    transformer with a learned MLP positional embedding of the patch centres (``cls_pos`` for
    the CLS token) -> LayerNorm -> concatenate the CLS token and the max over patch tokens.
    """

    def __init__(self, cfg: PointBindConfig) -> None:
        super().__init__()
        self.trans_dim = cfg.trans_dim
        self.group_divider = Group(cfg.num_group, cfg.group_size)
        self.encoder = MiniPointNet(cfg.encoder_dims, cfg.pointnet_dims)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, cfg.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, cfg.trans_dim))
        self.pos_embed = nn.Sequential(
            nn.Linear(3, cfg.pos_hidden), nn.GELU(), nn.Linear(cfg.pos_hidden, cfg.trans_dim)
        )
        self.blocks = PointTransformerEncoder(
            cfg.trans_dim, cfg.depth, cfg.num_heads, cfg.drop_path_rate
        )
        self.norm = nn.LayerNorm(cfg.trans_dim)

    def forward(self, pts: Tensor) -> Tensor:
        neighborhood, center = self.group_divider(pts)
        tokens = self.reduce_dim(self.encoder(neighborhood.to(self.reduce_dim.weight.dtype)))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat(
            [self.cls_pos.expand(b, -1, -1), self.pos_embed(center.to(tokens.dtype))], dim=1
        )
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)


class PointTransformerBind(nn.Module):
    """Reference ``PointTransformerBind``: the trunk, then ``pc_projection`` ``[2·dim, proj]``."""

    def __init__(self, cfg: PointBindConfig) -> None:
        super().__init__()
        self.point_encoder = PointTransformer(cfg)
        self.pc_projection = nn.Parameter(torch.empty(2 * cfg.trans_dim, cfg.proj_dim))
        nn.init.normal_(self.pc_projection, std=cfg.proj_dim**-0.5)

    def forward(self, pc: Tensor) -> Tensor:
        return self.point_encoder(pc) @ self.pc_projection


# --------------------------------------------------------------------------- the point branch


class PointBindModel(nn.Module):
    """The point branch of ``imagebind_w3D.pth`` with its exact key layout (module docstring).

    ``encode(pc [B, N, 3]) -> [B, out_embed_dim]``: F_M = normalize(head(trunk(pc))) · 1.
    """

    modality = "point"

    def __init__(self, cfg: PointBindConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or PointBindConfig()
        self.out_embed_dim = self.config.out_embed_dim
        self.point_trunk = PointTransformerBind(self.config)
        self.modality_heads = nn.ModuleDict(
            {
                "point": nn.Sequential(
                    nn.LayerNorm(self.config.proj_dim, eps=TRUNK_LN_EPS),
                    nn.Dropout(0.5),
                    nn.Linear(self.config.proj_dim, self.config.out_embed_dim, bias=False),
                )
            }
        )
        self.modality_postprocessors = nn.ModuleDict(
            {"point": nn.Sequential(Normalize(), LogitScale(POINT_LOGIT_SCALE, learnable=False))}
        )

    def features(self, pc: Tensor) -> Tensor:
        """Trunk -> projection -> head, before postprocessing: ``[B, out_embed_dim]``."""
        if pc.ndim != 3 or pc.shape[-1] != 3:
            raise ValueError(f"expected point clouds [B, N, 3], got shape {tuple(pc.shape)}")
        return self.modality_heads["point"](self.point_trunk(pc))

    def encode(self, pc: Tensor) -> Tensor:
        """Postprocessed F_M (unit norm: the point logit scale is 1)."""
        return self.modality_postprocessors["point"](self.features(pc).float())

    def forward(self, pc: Tensor) -> Tensor:
        return self.encode(pc)


def build_pointbind(preset: str = "huge", **overrides: Any) -> PointBindModel:
    """A ``PointBindModel`` from a preset (``huge``, ``small``, ``tiny``) with field overrides,
    in eval mode. Build under ``torch.device("meta")`` for the layout without allocating."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Point-Bind preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = replace(PRESETS[preset], **overrides)
    return PointBindModel(cfg).eval()


def preset_config(preset: str) -> dict[str, Any]:
    """The preset's sizes as a plain dict (for identities and reports)."""
    return asdict(PRESETS[preset])


# --------------------------------------------------------------------------- imagebind_w3D.pth


def is_point_key(key: str) -> bool:
    return key.startswith(POINT_PREFIXES)


def split_w3d_state(
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``imagebind_w3D.pth`` -> (ImageBind part, point part), split by key prefix."""
    imagebind = {k: v for k, v in state.items() if not is_point_key(k)}
    point = {k: v for k, v in state.items() if is_point_key(k)}
    return imagebind, point


_Model = TypeVar("_Model", bound=nn.Module)


def _load_strict(model: _Model, state: Mapping[str, Tensor], source: str) -> _Model:
    check_layout(model, state, source)  # WeightsError naming missing/unexpected/shape keys
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def load_pointbind_state(
    state: Mapping[str, Tensor], preset: str = "huge", source: str = "point branch"
) -> PointBindModel:
    """A ``PointBindModel`` of ``preset`` holding ``state`` (the point keys only), strictly."""
    with torch.device("meta"):
        model = build_pointbind(preset)
    return _load_strict(model, state, source).float().eval()


def load_encoder_checkpoint(
    path: str | Path, preset: str = "huge", *, require_point: bool = False
) -> tuple[ImageBindModel, PointBindModel | None]:
    """Load ``imagebind_huge.pth`` or ``imagebind_w3D.pth`` (either layout, any preset).

    The file is split by prefix: the ImageBind keys load strictly into ``build_model(preset)``,
    the point keys (if any) strictly into ``build_pointbind(preset)``; any missing, unexpected
    or mis-shaped key raises ``WeightsError`` naming it and the part it belongs to. A file
    without point keys gives ``(model, None)`` unless ``require_point``. Both models are built
    on the meta device and take the file's tensors (converted to float32).
    """
    state = read_state_dict(path)
    imagebind_state, point_state = split_w3d_state(state)
    with torch.device("meta"):
        model = build_model(preset)
    _load_strict(model, imagebind_state, f"{path} (ImageBind part)")
    model = model.float().eval()
    if not point_state:
        if require_point:
            raise WeightsError(
                f"checkpoint {path} has no point branch (no keys under {', '.join(POINT_PREFIXES)})"
            )
        return model, None
    if preset not in PRESETS:
        raise WeightsError(f"checkpoint {path} has a point branch but preset {preset!r} has none")
    point = load_pointbind_state(point_state, preset, f"{path} (point part)")
    if point.out_embed_dim != model.out_embed_dim:
        raise WeightsError(
            f"point head outputs {point.out_embed_dim}-d, ImageBind {model.out_embed_dim}-d"
        )
    return model, point


def w3d_state_dict(model: ImageBindModel, point: PointBindModel) -> dict[str, Tensor]:
    """The ``imagebind_w3D.pth`` layout of an (ImageBind, point branch) pair: one flat dict."""
    state = dict(model.state_dict())
    overlap = set(state) & set(point.state_dict())
    if overlap:  # cannot happen with the two classes here; guards a future rename
        raise WeightsError(f"ImageBind and point keys collide: {sorted(overlap)[:5]}")
    state.update(point.state_dict())
    return state
