"""ImageBind (Girdhar et al., 2023): one embedding space for six modalities.

``ImageBindModel`` takes exactly the keyword arguments and defaults of the reference
``imagebind.models.imagebind_model.ImageBindModel`` and produces the same state dict (every
name, shape and buffer), so ``imagebind_huge.pth`` loads with ``strict=True``. The computation is
the reference's, reorganised for speed (batch-first SDPA attention, folded image stem).

F_M = ImageBind_m(x): ``model.encode(modality, x)`` returns the postprocessed embedding
(L2-normalised, then multiplied by the modality's logit scale; clip axis averaged).
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn

from cachebind.encode import heads, stems
from cachebind.encode.transformer import Transformer, transformer_flops

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")

PRESETS: dict[str, dict[str, Any]] = {
    # imagebind_huge() of the reference: ViT-H/14 vision, OpenCLIP-H text, 1024-d outputs.
    "huge": dict(
        vision_embed_dim=1280,
        vision_num_blocks=32,
        vision_num_heads=16,
        text_embed_dim=1024,
        text_num_blocks=24,
        text_num_heads=16,
        out_embed_dim=1024,
        audio_drop_path=0.1,
        imu_drop_path=0.7,
    ),
    # The huge output size (1024-d, so caches and the LLaMA bind network fit) with a fraction
    # of the width and depth: for the demo on random weights and CPU benchmarks.
    "small": dict(
        out_embed_dim=1024,
        vision_embed_dim=256,
        vision_num_blocks=4,
        vision_num_heads=4,
        audio_embed_dim=192,
        audio_num_blocks=2,
        audio_num_heads=4,
        text_embed_dim=256,
        text_num_blocks=4,
        text_num_heads=4,
        depth_embed_dim=128,
        depth_num_blocks=2,
        depth_num_heads=4,
        thermal_embed_dim=128,
        thermal_num_blocks=2,
        thermal_num_heads=4,
        imu_embed_dim=128,
        imu_num_blocks=2,
        imu_num_heads=4,
    ),
    # Real input sizes and layout, tiny widths and depths: for tests and CPU smoke runs.
    "tiny": dict(
        out_embed_dim=64,
        vision_embed_dim=64,
        vision_num_blocks=2,
        vision_num_heads=4,
        audio_embed_dim=48,
        audio_num_blocks=2,
        audio_num_heads=4,
        text_embed_dim=64,
        text_num_blocks=2,
        text_num_heads=4,
        depth_embed_dim=32,
        depth_num_blocks=2,
        depth_num_heads=4,
        thermal_embed_dim=48,
        thermal_num_blocks=2,
        thermal_num_heads=4,
        imu_embed_dim=32,
        imu_num_blocks=2,
        imu_num_heads=4,
    ),
}


class ImageBindModel(nn.Module):
    """The ImageBind model with the reference constructor and state-dict layout.

    Like the reference, ``imu_kernel_size`` is accepted but unused (IMU patches are always 8
    samples), images are 224 x 224, text has 77 positions, IMU 2000 samples.
    """

    def __init__(
        self,
        video_frames: int = 2,
        kernel_size: tuple[int, int, int] = (2, 14, 14),
        audio_kernel_size: int = 16,
        audio_stride: int = 10,
        out_embed_dim: int = 768,
        vision_embed_dim: int = 1024,
        vision_num_blocks: int = 24,
        vision_num_heads: int = 16,
        audio_embed_dim: int = 768,
        audio_num_blocks: int = 12,
        audio_num_heads: int = 12,
        audio_num_mel_bins: int = 128,
        audio_target_len: int = 204,
        audio_drop_path: float = 0.1,
        text_embed_dim: int = 768,
        text_num_blocks: int = 12,
        text_num_heads: int = 12,
        depth_embed_dim: int = 384,
        depth_kernel_size: int = 16,
        depth_num_blocks: int = 12,
        depth_num_heads: int = 8,
        depth_drop_path: float = 0.0,
        thermal_embed_dim: int = 768,
        thermal_kernel_size: int = 16,
        thermal_num_blocks: int = 12,
        thermal_num_heads: int = 12,
        thermal_drop_path: float = 0.0,
        imu_embed_dim: int = 512,
        imu_kernel_size: int = 8,
        imu_num_blocks: int = 6,
        imu_num_heads: int = 8,
        imu_drop_path: float = 0.7,
    ) -> None:
        super().__init__()
        # Configurations loaded from JSON give a list; the stem needs exactly three sizes.
        k_t, k_h, k_w = kernel_size
        kernel_size = (k_t, k_h, k_w)
        self.out_embed_dim = out_embed_dim
        self.embed_dims = {
            "vision": vision_embed_dim,
            "text": text_embed_dim,
            "audio": audio_embed_dim,
            "depth": depth_embed_dim,
            "thermal": thermal_embed_dim,
            "imu": imu_embed_dim,
        }
        self.modality_preprocessors = nn.ModuleDict(
            {
                "vision": _vision_preprocessor(vision_embed_dim, kernel_size, video_frames),
                "text": stems.TextPreprocessor(text_embed_dim),
                "audio": _audio_preprocessor(
                    audio_embed_dim,
                    audio_kernel_size,
                    audio_stride,
                    audio_num_mel_bins,
                    audio_target_len,
                ),
                "depth": _image_like_preprocessor("depth_stem", depth_embed_dim, depth_kernel_size),
                "thermal": _image_like_preprocessor(
                    "rgbt_stem", thermal_embed_dim, thermal_kernel_size
                ),
                "imu": stems.IMUPreprocessor(imu_embed_dim),
            }
        )
        # (dim, blocks, heads, pre-transformer LayerNorm, bias_k/bias_v, drop path)
        trunk_args = {
            "vision": (vision_embed_dim, vision_num_blocks, vision_num_heads, True, False, 0.0),
            "text": (text_embed_dim, text_num_blocks, text_num_heads, False, False, 0.0),
            "audio": (
                audio_embed_dim,
                audio_num_blocks,
                audio_num_heads,
                False,
                True,
                audio_drop_path,
            ),
            "depth": (
                depth_embed_dim,
                depth_num_blocks,
                depth_num_heads,
                False,
                True,
                depth_drop_path,
            ),
            "thermal": (
                thermal_embed_dim,
                thermal_num_blocks,
                thermal_num_heads,
                False,
                True,
                thermal_drop_path,
            ),
            "imu": (imu_embed_dim, imu_num_blocks, imu_num_heads, False, True, imu_drop_path),
        }
        self.modality_trunks = nn.ModuleDict(
            {
                m: Transformer(
                    dim,
                    blocks,
                    nheads,
                    pre_transformer_ln=pre_ln,
                    add_bias_kv=bias_kv,
                    drop_path_rate=dpr,
                )
                for m, (dim, blocks, nheads, pre_ln, bias_kv, dpr) in trunk_args.items()
            }
        )
        self.modality_heads = nn.ModuleDict(
            {
                "vision": heads.cls_head(vision_embed_dim, out_embed_dim),
                "text": heads.text_head(text_embed_dim, out_embed_dim),
                "audio": heads.cls_head(audio_embed_dim, out_embed_dim),
                "depth": heads.cls_head(depth_embed_dim, out_embed_dim),
                "thermal": heads.cls_head(thermal_embed_dim, out_embed_dim),
                "imu": heads.cls_head(imu_embed_dim, out_embed_dim, dropout=0.5),
            }
        )
        self.modality_postprocessors = nn.ModuleDict(
            {m: heads.postprocessor(m) for m in MODALITIES}
        )

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Reference-compatible call: ``{modality: input}`` -> ``{modality: embedding}``."""
        return {m: self.encode(m, x) for m, x in inputs.items()}

    def encode(self, modality: str, x: Tensor) -> Tensor:
        """F_M = ImageBind_m(x), postprocessed; inputs with a clip axis are averaged over it.

        Like the reference, any input of 5 or more dimensions has a clip axis at position 1
        (audio ``[B, 3, 1, 128, 204]``, video ``[B, S, 3, 2, 224, 224]``): the ``B * S`` clips
        are encoded independently and their postprocessed embeddings averaged.
        """
        if modality not in self.modality_trunks:
            raise KeyError(f"unknown ImageBind modality {modality!r}; expected one of {MODALITIES}")
        clips = x.ndim >= 5
        if clips:
            b, s = x.shape[:2]
            x = x.reshape(b * s, *x.shape[2:])
        out = self.modality_postprocessors[modality](self.features(modality, x).float())
        if clips:
            out = out.reshape(b, s, -1).mean(dim=1)
        return out

    def features(self, modality: str, x: Tensor) -> Tensor:
        """Preprocessor -> trunk -> head, before postprocessing: ``[B, out_embed_dim]``."""
        pre = self.modality_preprocessors[modality]
        trunk = self.modality_trunks[modality]
        head = self.modality_heads[modality]
        if modality == "text":
            tokens, eot = pre(x)
            return head(trunk(tokens, causal=True), eot)
        return head(trunk(pre(x)))

    def vision_features_and_tokens(self, x: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """One vision pass: the postprocessed embedding ``[B, out_embed_dim]`` (as ``encode``)
        and the patch tokens of hidden state ``layer`` ``[B, patches, vision_embed_dim]``.

        Hidden state 0 is the trunk's input after its LayerNorm, state i the output of block
        i (transformers' ``hidden_states`` convention, so -2 is LLaVA's second-to-last
        layer); the CLS token (position 0) is dropped, LLaVA's ``"default"`` selection."""
        trunk = cast(Transformer, self.modality_trunks["vision"])
        wanted = self.token_state(layer)
        h = trunk.pre_transformer_layer(self.modality_preprocessors["vision"](x))
        tokens = h if wanted == 0 else None
        for i, block in enumerate(trunk.blocks, start=1):
            h = block(h)
            if i == wanted:
                tokens = h
        assert tokens is not None
        out = self.modality_postprocessors["vision"](self.modality_heads["vision"](h).float())
        return out, tokens[:, 1:]

    def token_state(self, layer: int) -> int:
        """The non-negative index of hidden state ``layer`` of the vision trunk, or a
        ``ValueError`` naming the range."""
        n_states = len(cast(Transformer, self.modality_trunks["vision"]).blocks) + 1
        if not -n_states <= layer < n_states:
            raise ValueError(
                f"token layer {layer} is outside the vision trunk's hidden states "
                f"{-n_states}..{n_states - 1}"
            )
        return layer % n_states

    def vision_token_shape(self) -> tuple[int, int]:
        """(patches, width) of the vision trunk's patch tokens for one image."""
        pre = cast(stems.VisionPreprocessor, self.modality_preprocessors["vision"])
        return int(pre.num_patches), int(self.embed_dims["vision"])

    def vision_flops(self, frames: int = 1) -> float:
        """Analytic forward FLOPs of one image (``frames=1``) or one 2-frame clip (``frames=2``)
        through the vision encoder (~334 GFLOP for ``huge``)."""
        pre = cast(stems.VisionPreprocessor, self.modality_preprocessors["vision"])
        conv = pre.stages()[1]
        dim = self.embed_dims["vision"]
        patch = conv.weight[0, 0].numel()  # k_t * k_h * k_w; the folded image stem skips k_t
        if frames == 1:
            patch //= conv.kernel_size[0]
        stem = 2.0 * pre.num_patches * dim * 3 * patch
        trunk = cast(Transformer, self.modality_trunks["vision"])
        body = transformer_flops(dim, pre.num_patches + 1, len(trunk.blocks))
        return stem + body + 2.0 * dim * self.out_embed_dim


def _vision_preprocessor(
    dim: int, kernel_size: tuple[int, int, int], video_frames: int
) -> stems.VisionPreprocessor:
    pad = stems.PadIm2Video(ntimes=2)
    conv = nn.Conv3d(3, dim, kernel_size=kernel_size, stride=kernel_size, bias=False)
    frames = 2 if video_frames == 1 else video_frames  # PadIm2Video repeats a single frame
    layout = (
        stems.conv_output(frames, kernel_size[0], kernel_size[0]),
        stems.conv_output(stems.IMAGE_SIZE, kernel_size[1], kernel_size[1]),
        stems.conv_output(stems.IMAGE_SIZE, kernel_size[2], kernel_size[2]),
    )
    stem = stems.PatchEmbed(nn.Sequential(pad, conv))
    return stems.VisionPreprocessor("rgbt_stem", stem, layout, dim)


def _audio_preprocessor(
    dim: int, kernel: int, stride: int, mel_bins: int, target_len: int
) -> stems.PatchPreprocessor:
    conv = nn.Conv2d(1, dim, kernel_size=kernel, stride=stride, bias=False)
    layout = (
        stems.conv_output(mel_bins, kernel, stride),
        stems.conv_output(target_len, kernel, stride),
    )
    return stems.PatchPreprocessor(
        "rgbt_stem", stems.PatchEmbed(conv, nn.LayerNorm(dim)), layout, dim
    )


def _image_like_preprocessor(stem_name: str, dim: int, kernel: int) -> stems.PatchPreprocessor:
    """Depth and thermal: one channel, 224 x 224, non-overlapping ``kernel`` patches."""
    conv = nn.Conv2d(1, dim, kernel_size=kernel, stride=kernel, bias=False)
    side = stems.conv_output(stems.IMAGE_SIZE, kernel, kernel)
    stem = stems.PatchEmbed(conv, nn.LayerNorm(dim))
    return stems.PatchPreprocessor(stem_name, stem, (side, side), dim)


def build_model(preset: str = "huge", **overrides: Any) -> ImageBindModel:
    """An ``ImageBindModel`` from a preset (``huge``, ``tiny``) with keyword overrides, in eval
    mode. Build under ``torch.device("meta")`` to get the layout without allocating weights."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ImageBind preset {preset!r}; known: {sorted(PRESETS)}")
    model = ImageBindModel(**{**PRESETS[preset], **overrides})
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Number of elements in the state dict (parameters and buffers), as a checkpoint counts."""
    return sum(t.numel() for t in model.state_dict().values())
