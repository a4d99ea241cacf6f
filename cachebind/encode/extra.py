"""Extra image encoders of the embedding job (``embed.extra_encoders``), run by transformers
from their published Hugging Face layouts:

- ``clip336``: ``CLIPVisionModelWithProjection`` (CLIP ViT-L/14-336, LLaVA-1.5's tower). The
  global vector is ``image_embeds`` (the pooled CLS through ``visual_projection``). A directory
  of the whole CLIP model (``model_type: "clip"``, as openai/clip-vit-large-patch14-336 ships)
  gives its vision half; the text tower's tensors are not read into the model.
- ``dinov2``: ``Dinov2Model``. The global vector is the last layer's CLS token after the final
  LayerNorm (``pooler_output``).

Both are L2-normalised, as ImageBind's ``vector`` is, so an inner-product index searches them
the same way. Patch tokens are ``hidden_states[layer]`` without CLS (LLaVA's ``"default"``).
Loading is strict: a missing, unexpected or differently shaped tensor is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
)

from cachebind.encode.tensorfiles import checkpoint_files, read_tensors
from cachebind.encode.weights import check_layout, file_sha256
from cachebind.errors import WeightsError
from cachebind.preprocess.extra import PREPROCESS

MODEL_TYPES = {"clip336": ("clip_vision_model", "clip"), "dinov2": ("dinov2",)}
"""The ``config.json`` model types each name accepts (a whole CLIP model for its vision half)."""

DINOV2_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
"""Published DINOv2 checkpoints' attention names -> transformers 5's in-memory names (its
``save_pretrained`` writes the published ones back)."""

CHUNK = 64
"""Images an extra encoder runs at once: a CLIP ViT-L/14-336 chunk in float32 keeps its
activations to a few GB."""

# Tensors transformers derives rather than loads (buffers of older checkpoints).
DERIVED_SUFFIXES = ("position_ids",)


@dataclass(frozen=True)
class ExtraShape:
    """What a table needs of an extra encoder before any weights are read."""

    out_dim: int
    patches: int
    width: int
    hidden_states: int
    """Hidden states of its trunk: the embeddings' output and one per layer."""

    def token_state(self, layer: int, name: str) -> int:
        """The non-negative index of hidden state ``layer``, or a ValueError naming the range."""
        n = self.hidden_states
        if not -n <= layer < n:
            raise ValueError(f"token layer {layer} is outside {name}'s hidden states {-n}..{n - 1}")
        return layer % n


def read_config(name: str, directory: Path) -> PretrainedConfig:
    """The vision configuration of encoder ``name``'s checkpoint directory, checked."""
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read the model configuration ({exc})") from exc
    kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
    if kind not in MODEL_TYPES[name]:
        raise WeightsError(
            f"{path}: model_type is {kind!r}; {name} takes {' or '.join(MODEL_TYPES[name])}"
        )
    try:
        if name == "dinov2":
            config: PretrainedConfig = Dinov2Config.from_dict(raw)
        elif kind == "clip":  # the whole model: its vision half and the shared projection size
            vision = dict(raw.get("vision_config") or {})
            # The whole model's projection_dim is the projection's (its vision_config may
            # carry the sub-config's default).
            if "projection_dim" in raw:
                vision["projection_dim"] = raw["projection_dim"]
            config = CLIPVisionConfig.from_dict(vision)
        else:
            config = CLIPVisionConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise WeightsError(f"{path}: not a {name} configuration ({exc})") from exc
    crop = PREPROCESS[name].crop
    if name == "clip336" and int(config.image_size) != crop:
        # CLIP's position embeddings are learnt for one size; LLaVA-1.5's tower is 336.
        raise WeightsError(f"{path}: image_size is {config.image_size}; clip336 takes {crop}")
    if crop % int(config.patch_size):
        raise WeightsError(f"{path}: patch_size {config.patch_size} does not divide {crop}")
    return config


def extra_shape(name: str, config: PretrainedConfig) -> ExtraShape:
    side = PREPROCESS[name].crop // int(config.patch_size)
    out_dim = int(config.projection_dim if name == "clip336" else config.hidden_size)
    return ExtraShape(
        out_dim=out_dim,
        patches=side * side,
        width=int(config.hidden_size),
        hidden_states=int(config.num_hidden_layers) + 1,
    )


def weights_sha256(directory: Path) -> str:
    """One sha256 over the directory's weight files (each file's name and sha256)."""
    digest = hashlib.sha256()
    for f in checkpoint_files(directory):
        if not f.is_file():
            raise WeightsError(f"{directory}: weight file {f.name} is missing")
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def extra_identity(name: str, directory: Path, config: PretrainedConfig) -> dict[str, Any]:
    """What a table records of encoder ``name`` and compares as ImageBind's ``encoder``: the
    weights' sha256, not the directory's path (which may differ between machines)."""
    sha = weights_sha256(directory)
    return {
        "model": name,
        "architecture": type(config).__name__.removesuffix("Config"),
        "out_dim": extra_shape(name, config).out_dim,
        "weights": f"sha256:{sha}",
        "preprocess": PREPROCESS[name].record(),
    }


def _state(
    name: str, tensors: dict[str, Tensor], config_kind: str, model_names: set[str]
) -> dict[str, Tensor]:
    out = {k: v for k, v in tensors.items() if not k.endswith(DERIVED_SUFFIXES)}
    if name == "clip336" and config_kind == "clip":
        # The whole CLIP model: the vision tower and its projection are this model's tensors.
        keep = ("vision_model.", "visual_projection.")
        return {k: v for k, v in out.items() if k.startswith(keep)}
    if name == "dinov2":
        # Saved from a head model (Dinov2ForImageClassification) the backbone is "dinov2.*".
        prefixed = {k.removeprefix("dinov2."): v for k, v in out.items() if k.startswith("dinov2.")}
        return {_renamed(k, model_names): v for k, v in (prefixed or out).items()}
    return out


def _renamed(key: str, model_names: set[str]) -> str:
    if key in model_names:
        return key
    for old, new in DINOV2_RENAMES:
        key = key.replace(old, new)
    return key


class ExtraEncoder:
    """One extra encoder in eval mode: pixels of its preprocessing -> (vector, tokens)."""

    def __init__(self, name: str, model: PreTrainedModel, shape: ExtraShape, device: str) -> None:
        self.name = name
        self.model = model
        self.shape = shape
        self.preprocess = PREPROCESS[name]
        self.device = torch.device(device)

    @classmethod
    def load(cls, name: str, directory: str | Path, device: str = "cpu") -> ExtraEncoder:
        directory = Path(directory)
        if not directory.is_dir():
            raise WeightsError(f"{name}: {directory} is not a checkpoint directory")
        config = read_config(name, directory)
        kind = json.loads((directory / "config.json").read_text())["model_type"]
        model: PreTrainedModel
        # Eager attention: the same arithmetic on every machine, whatever kernels it has.
        config._attn_implementation = "eager"
        if isinstance(config, Dinov2Config):
            model = Dinov2Model(config)
        else:
            assert isinstance(config, CLIPVisionConfig)
            model = CLIPVisionModelWithProjection(config)
        expected = {k for k in model.state_dict() if not k.endswith(DERIVED_SUFFIXES)}
        state = _state(name, read_tensors(directory), kind, expected)
        # Buffers transformers derives are kept from the model, never from a file.
        state.update({k: v for k, v in model.state_dict().items() if k not in expected})
        check_layout(model, state, f"{name} {directory}")
        model.load_state_dict(state, strict=True)
        # nn.Module's own ``to``: transformers' wrapper of it is typed for another call.
        moved = cast(PreTrainedModel, nn.Module.to(model, torch.device(device)))
        return cls(name, moved.eval(), extra_shape(name, config), device)

    @torch.inference_mode()
    def encode(
        self, pixels: Tensor, layer: int | None = None, batch_size: int = CHUNK
    ) -> tuple[Tensor, Tensor | None]:
        """L2-normalised global vectors float32 ``[B, out_dim]`` and, with ``layer``, the patch
        tokens of that hidden state without CLS, float16 ``[B, patches, width]`` (CPU), run
        ``batch_size`` images at a time (a job's block may be larger than a device holds)."""
        state = None if layer is None else self.shape.token_state(layer, self.name)
        vectors, tokens = [], []
        for chunk in pixels.split(batch_size):
            x = chunk.to(self.device, torch.float32)
            out = self.model(pixel_values=x, output_hidden_states=state is not None)
            glob = out.image_embeds if self.name == "clip336" else out.pooler_output
            vectors.append(F.normalize(glob.float(), dim=-1).cpu())
            if state is not None:
                tokens.append(out.hidden_states[state][:, 1:].to(torch.float16).cpu())
        if not vectors:  # no images: empty results of the right widths
            empty = torch.empty(0, self.shape.patches, self.shape.width, dtype=torch.float16)
            return torch.empty(0, self.shape.out_dim), None if state is None else empty
        return torch.cat(vectors), torch.cat(tokens) if tokens else None
