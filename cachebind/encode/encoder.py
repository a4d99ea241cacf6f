"""The Encoder: an ImageBind model on a device, in a dtype, batched; F_M = ImageBind_m(x)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cachebind.config import EncoderConfig, InputLimits, WeightsConfig
from cachebind.device import resolve_device, resolve_dtype
from cachebind.encode import pointbind
from cachebind.encode.imagebind import ImageBindModel, build_model
from cachebind.encode.pointbind import PointBindModel
from cachebind.encode.weights import KNOWN_WEIGHTS, file_sha256
from cachebind.errors import InputError, WeightsError
from cachebind.modalities import Modality


def _preprocess_version() -> str | None:
    try:
        from cachebind.preprocess import PREPROCESS_VERSION
    except ImportError:
        return None
    return str(PREPROCESS_VERSION)


class Encoder:
    """Batched ImageBind inference.

    ``encode`` gives the reference's postprocessed outputs (what ImageBind's own zero-shot code
    compares); ``embed`` gives F_M, the unit vectors the cache and the API use.

    ``point_model`` (Point-Bind's point branch, from ``imagebind_w3D.pth``) serves
    ``Modality.POINT``; without it a point input is refused.
    """

    def __init__(
        self,
        model: ImageBindModel,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        identity: dict[str, Any] | None = None,
        *,
        batch_size: int = 64,
        pretrained: bool = False,
        point_model: PointBindModel | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        # Weights stay fp32; reduced precision runs under autocast, which keeps LayerNorm,
        # softmax statistics and the postprocessing in fp32.
        self.model = model.to(self.device).eval().requires_grad_(False)
        if point_model is not None and point_model.out_embed_dim != model.out_embed_dim:
            raise ValueError(
                f"point branch outputs {point_model.out_embed_dim}-d, "
                f"ImageBind {model.out_embed_dim}-d"
            )
        self.point_model = (
            point_model.to(self.device).eval().requires_grad_(False) if point_model else None
        )
        self.batch_size = max(1, int(batch_size))
        self.pretrained = pretrained
        self.identity: dict[str, Any] = dict(identity or {})
        self.identity.setdefault("out_dim", self.out_dim)

    @property
    def out_dim(self) -> int:
        return self.model.out_embed_dim

    @classmethod
    def from_config(cls, cfg: EncoderConfig, weights: WeightsConfig) -> Encoder:
        """Build the preset of ``cfg`` and load its checkpoint.

        The checkpoint is ``cfg.checkpoint`` when set (it must exist), else
        ``<weights.dir>/imagebind_huge.pth`` for the ``huge`` preset when that file is present;
        otherwise the model is randomly initialised from ``cfg.seed`` and ``pretrained`` is False.
        """
        path: Path | None = None
        if cfg.checkpoint is not None:
            path = Path(cfg.checkpoint)
            if not path.is_file():
                raise WeightsError(f"encoder checkpoint not found: {path}")
        elif cfg.preset == "huge":
            default = Path(weights.dir) / KNOWN_WEIGHTS["imagebind_huge"].filename
            path = default if default.is_file() else None

        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        identity: dict[str, Any] = {"model": "imagebind", "preset": cfg.preset}
        if path is not None:
            # Built without allocating, the models take the checkpoint's tensors (as float32);
            # an imagebind_w3D.pth also yields Point-Bind's point branch.
            model, point_model = pointbind.load_encoder_checkpoint(path, cfg.preset)
            sha = file_sha256(path)
            identity.update(checkpoint=str(path.resolve()), sha256=sha, weights=f"sha256:{sha}")
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = build_model(cfg.preset)
                point_model = None
                if cfg.preset in pointbind.PRESETS:
                    point_model = pointbind.build_pointbind(cfg.preset)
            identity.update(checkpoint=None, sha256=None, weights=f"random-init:seed={cfg.seed}")
        # No identity entry for the point branch: it does not change any cached (image) vector,
        # and tables compare identities to refuse mixing encoders.
        identity["preprocess_version"] = _preprocess_version()
        return cls(
            model,
            device,
            dtype,
            identity,
            batch_size=cfg.batch_size,
            pretrained=path is not None,
            point_model=point_model,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _chunks(self, batch: Tensor) -> Iterator[Tensor]:
        # A sample with a clip axis (audio: 3 clips, video: 15) costs that many forward passes,
        # so batch_size counts clips, not samples.
        clips = batch.shape[1] if batch.ndim >= 5 else 1
        step = max(1, self.batch_size // clips)
        yield from batch.split(step)

    @torch.inference_mode()
    def encode(self, modality: Modality | str, batch: Tensor) -> Tensor:
        """ImageBind_m(batch), postprocessed as the reference: ``[B, out_dim]`` float32 on CPU."""
        trunk = Modality(modality).trunk
        point_model = self.point_model if trunk == "point" else None
        if trunk == "point" and point_model is None:
            raise InputError(
                "<point batch>",
                "unsupported_modality",
                "this encoder has no point branch: load Point-Bind's imagebind_w3D.pth",
            )
        if batch.shape[0] == 0:
            return torch.empty(0, self.out_dim)
        outs = []
        for chunk in self._chunks(batch):
            if chunk.is_floating_point():
                chunk = chunk.float()
            chunk = chunk.to(self.device, non_blocking=True)
            with self._autocast():
                if point_model is not None:
                    out = point_model.encode(chunk)
                else:
                    out = self.model.encode(trunk, chunk)
            outs.append(out.float().cpu())
        return torch.cat(outs)

    @torch.inference_mode()
    def encode_image_tokens(self, batch: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """``encode(IMAGE, batch)`` and, from the same pass, the patch tokens of hidden state
        ``layer`` (CLS dropped): ``[B, out_dim]`` float32 and ``[B, patches, width]`` float16,
        on the CPU. float16 is what the cache stores."""
        patches, width = self.model.vision_token_shape()
        if batch.shape[0] == 0:
            return torch.empty(0, self.out_dim), torch.empty(0, patches, width, dtype=torch.half)
        outs, tokens = [], []
        for chunk in self._chunks(batch):
            chunk = chunk.float().to(self.device, non_blocking=True)
            with self._autocast():
                out, tok = self.model.vision_features_and_tokens(chunk, layer)
            outs.append(out.float().cpu())
            tokens.append(tok.to(torch.float16).cpu())
        return torch.cat(outs), torch.cat(tokens)

    def embed(
        self,
        modality: Modality | str,
        inputs: Sequence[Any],
        sources: Sequence[str] | None = None,
        limits: InputLimits | None = None,
    ) -> np.ndarray:
        """F_M for raw inputs (bytes, paths, text, arrays …): preprocess each with
        ``cachebind.preprocess.preprocess`` within ``limits`` (``Settings.input``; its defaults
        when None), encode, L2-normalise. ``[B, out_dim]`` float32."""
        from cachebind.preprocess import preprocess  # lazy: preprocessing is another stage

        modality = Modality(modality)
        if not len(inputs):
            return np.zeros((0, self.out_dim), dtype=np.float32)
        names = (
            list(sources) if sources is not None else [f"<input {i}>" for i in range(len(inputs))]
        )
        batch = torch.stack(
            [
                preprocess(modality, x, source=src, limits=limits)
                for x, src in zip(inputs, names, strict=True)
            ]
        )
        return F.normalize(self.encode(modality, batch), dim=-1).numpy().astype(np.float32)
