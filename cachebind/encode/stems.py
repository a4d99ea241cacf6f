"""Modality preprocessors: raw tensors -> token sequences ``[B, L, D]`` for the trunks.

Module and parameter names follow the reference ``multimodal_preprocessors.py``
(``rgbt_stem.proj.1.weight``, ``pos_embedding_helper.pos_embed``, ``cls_token``,
``token_embedding``, ``mask``, ``imu_stem`` …). Note that the stems' own LayerNorms keep torch's
default eps 1e-5, as in the reference; only trunk and head norms use 1e-6.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SIZE = 224  # hard-coded by the reference for vision, depth and thermal
TEXT_CONTEXT = 77
TEXT_VOCAB = 49408
IMU_CHANNELS = 6
IMU_SAMPLES = 2000
IMU_KERNEL = 8  # the reference ignores ``imu_kernel_size`` and always uses 8 (6 * 8 = 48 inputs)


class PadIm2Video(nn.Module):
    """An image ``[B, C, H, W]`` becomes a video ``[B, C, T, H, W]`` with T repeated ``ntimes``."""

    def __init__(self, ntimes: int = 2) -> None:
        super().__init__()
        self.ntimes = ntimes

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise ValueError(f"expected an image or video tensor, got shape {tuple(x.shape)}")
        if x.shape[2] == 1:
            x = x.repeat(1, 1, self.ntimes, 1, 1)
        return x


class PatchEmbed(nn.Module):
    """``proj`` (conv or linear) then an optional ``norm_layer``; outputs ``[B, N, D]``."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: Tensor) -> Tensor:
        return self.finish(self.proj(x))

    def finish(self, y: Tensor) -> Tensor:
        """``[B, D, *grid]`` -> ``[B, N, D]`` (then the norm, if any)."""
        return self.norm(y.flatten(2).transpose(1, 2))

    def norm(self, y: Tensor) -> Tensor:
        """``norm_layer`` on ``y``, if there is one."""
        return self.norm_layer(y) if self.norm_layer is not None else y


class PosEmbedding(nn.Module):
    """Learned positional embedding holder (reference ``SpatioTemporalPosEmbeddingHelper``)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))


def _interpolate_2d(grid: Tensor, target: int) -> Tensor:
    """Bicubic resize of a square ``[1, N, D]`` grid of position embeddings to ``target`` cells."""
    n, dim = grid.shape[1], grid.shape[2]
    side = math.isqrt(n)
    dtype = grid.dtype
    # interpolate has no bf16 bicubic kernel everywhere: compute in fp32 as the reference does.
    img = grid.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    img = F.interpolate(img, scale_factor=math.sqrt(target / n), mode="bicubic")
    return img.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)


class PatchPreprocessor(nn.Module):
    """Patch stem + CLS token + learned positions (vision, audio, depth, thermal).

    ``stem_name`` is the reference attribute the stem lives under: ``rgbt_stem`` for vision,
    audio and thermal, ``depth_stem`` for depth.
    """

    def __init__(
        self, stem_name: str, stem: PatchEmbed, patches_layout: tuple[int, ...], dim: int
    ) -> None:
        super().__init__()
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.patches_layout = patches_layout
        self.num_patches = math.prod(patches_layout)
        self.embed_dim = dim
        self.pos_embedding_helper = PosEmbedding(self.num_patches + 1, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # OpenCLIP-style init, as the reference.
        scale = self.embed_dim**-0.5
        nn.init.normal_(self.pos_embedding_helper.pos_embed).mul_(scale)
        nn.init.normal_(self.cls_token).mul_(scale)

    @property
    def stem(self) -> PatchEmbed:
        return getattr(self, self.stem_name)

    def patchify(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patchify(x)
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        return tokens + self.pos_embed(x.ndim, tokens.shape[1] - 1)

    def pos_embed(self, input_ndim: int, n_patches: int) -> Tensor:
        """Position embeddings for ``n_patches`` patches, resized when the input size differs."""
        pe = self.pos_embedding_helper.pos_embed
        if n_patches == self.num_patches:
            return pe
        layout = self.patches_layout
        if layout[-1] != layout[-2]:
            raise ValueError(f"cannot resize position embeddings of non-square layout {layout}")
        cls, grid = pe[:, :1], pe[:, 1:]
        if len(layout) == 3 and layout[0] > 1:
            # Temporal layout: like the reference, only images (4-d input) are supported, using
            # the embeddings of the first frame.
            if input_ndim != 4:
                raise ValueError("temporal position-embedding interpolation is not supported")
            grid = grid.view(1, layout[0], layout[1] * layout[2], -1)[0, :1]
        return torch.cat([cls, _interpolate_2d(grid, n_patches)], dim=1)


class VisionPreprocessor(PatchPreprocessor):
    """Images ``[B, 3, H, W]`` and 2-frame videos ``[B, 3, T, H, W]`` -> tokens.

    The stored stem is ``Conv3d(kernel = stride = (2, 14, 14))`` on the image repeated to two
    frames (``PadIm2Video``). Both frames being identical, conv3d(repeat(x), W) equals
    conv2d(x, W.sum(time)): images take that exact folded Conv2d, half the stem FLOPs and no
    repeated copy, while real videos still go through the Conv3d.
    """

    def stages(self) -> tuple[PadIm2Video, nn.Conv3d]:
        """The stem's two stages (``proj`` is built as ``Sequential(PadIm2Video, Conv3d)``)."""
        proj = cast(nn.Sequential, self.stem.proj)
        return cast(PadIm2Video, proj[0]), cast(nn.Conv3d, proj[1])

    def patchify(self, x: Tensor) -> Tensor:
        pad, conv = self.stages()
        single_frame = x.ndim == 4 or (x.ndim == 5 and x.shape[2] == 1)
        if single_frame and conv.kernel_size[0] == pad.ntimes == conv.stride[0]:
            img = x if x.ndim == 4 else x[:, :, 0]
            weight = conv.weight.sum(dim=2)
            y = F.conv2d(img, weight, stride=conv.stride[1:], padding=conv.padding[1:])
            return self.stem.finish(y)
        return self.stem(x)


class TextPreprocessor(nn.Module):
    """Token ids ``[B, 77]`` -> token embeddings + positions; EOT index = argmax of the ids."""

    def __init__(self, dim: int, context_length: int = TEXT_CONTEXT, vocab: int = TEXT_VOCAB):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.empty(1, context_length, dim))
        # Kept only because it is part of the checkpoint layout; attention uses is_causal.
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("mask", mask)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(tokens [B, L, D], eot_index [B])``."""
        tokens = self.token_embedding(text) + self.pos_embed
        # The EOT token (49407) has the highest id in the vocabulary, so argmax finds it.
        return tokens, text.argmax(dim=-1)


class IMUPreprocessor(nn.Module):
    """IMU ``[B, 6, 2000]`` -> 250 patches of 6 x 8 samples -> Linear(48, D) -> LayerNorm."""

    def __init__(self, dim: int, kernel_size: int = IMU_KERNEL, samples: int = IMU_SAMPLES) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.embed_dim = dim
        self.imu_stem = PatchEmbed(
            nn.Linear(IMU_CHANNELS * kernel_size, dim, bias=False), nn.LayerNorm(dim)
        )
        self.pos_embed = nn.Parameter(torch.empty(1, samples // kernel_size + 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.cls_token).mul_(self.embed_dim**-0.5)

    def forward(self, imu: Tensor) -> Tensor:
        k = self.kernel_size
        # [B, 6, T] -> [B, T/k, 6, k] -> [B, T/k, 6k]: channel-major within each patch.
        patches = imu.unfold(-1, k, k).permute(0, 2, 1, 3).flatten(2)
        tokens = self.imu_stem.norm(self.imu_stem.proj(patches))
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


def conv_output(size: int, kernel: int, stride: int) -> int:
    """Output length of an unpadded convolution."""
    return (size - kernel) // stride + 1
