"""Load a llava-hf LLaVA-1.5 checkpoint directory strictly into ``LlavaTokensModel``.

The directory is what transformers writes for ``LlavaForConditionalGeneration``:
``config.json`` (``model_type: "llava"``) and ``model.safetensors`` or shards with their
``model.safetensors.index.json``. Tensor names are ``vision_tower.*``,
``multi_modal_projector.linear_1/linear_2.*``, ``language_model.model.*`` and
``language_model.lm_head.weight``; the published llava-hf checkpoints nest the tower one level
deeper (``vision_tower.vision_model.*``, the layout of transformers 4.x), and transformers 5's
in-memory names (``model.language_model.*``, ``lm_head.*``) are accepted too. Every tensor the
model has must be present with its shape, and none may be left over: a difference is refused
with the tensor's name, never loaded partially. Only buffers the model recomputes (position ids,
rotary frequencies, which older writers saved) are dropped unread.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlavaConfig

from cachebind.bind.projector import from_mm_projector
from cachebind.encode.tensorfiles import read_tensors
from cachebind.encode.weights import check_layout
from cachebind.errors import WeightsError
from cachebind.inject.llava import LlavaTokensModel, text_config

# Alternative spellings of a name -> this module's name (applied until none matches).
NAME_PREFIXES = (
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# Buffers that older writers saved and the model recomputes (CLIP's position ids, LLaMA's
# rotary frequencies): dropped, never compared, like Meta's ``rope.freqs``.
DERIVED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")
LM_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"


def canonical_name(name: str) -> str:
    """The ``LlavaTokensModel`` name of a checkpoint tensor name."""
    changed = True
    while changed:
        changed = False
        for old, new in NAME_PREFIXES:
            if name.startswith(old):
                name, changed = new + name[len(old) :], True
    return name


def read_llava_config(directory: Path) -> LlavaConfig:
    """The ``LlavaConfig`` of a checkpoint directory's ``config.json``, checked."""
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read the model configuration ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("model_type") != "llava":
        kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise WeightsError(f"{path}: model_type is {kind!r}, not 'llava'")
    try:
        config = LlavaConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise WeightsError(f"{path}: not a LLaVA configuration ({exc})") from exc
    return config


def canonical_state(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``tensors`` under this module's names; two file names for one tensor are refused."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in tensors.items():
        if name.endswith(DERIVED_SUFFIXES):
            continue
        key = canonical_name(name)
        if key in out:
            raise WeightsError(f"{source}: {origin[key]} and {name} are both {key}")
        out[key], origin[key] = tensor, name
    return out


def read_mm_projector(path: Path) -> dict[str, torch.Tensor]:
    """LLaVA's stage-1 ``mm_projector.bin`` (``model.mm_projector.0/2.*``) as ``LlavaProjector``
    tensors (``linear_1/linear_2.*``)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - name the unreadable file
        raise WeightsError(f"{path}: cannot read the projector ({exc})") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    try:
        return from_mm_projector(raw, str(path))
    except ValueError as exc:
        raise WeightsError(str(exc)) from exc


def replace_projector(
    state: dict[str, torch.Tensor], projector: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """``state`` with its ``multi_modal_projector.*`` tensors replaced by ``projector``'s, which
    must be exactly those tensors in those shapes."""
    prefix = "multi_modal_projector."
    have = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if set(projector) != set(have):
        raise WeightsError(
            f"{source} holds {sorted(projector)}, the model's projector {sorted(have)}"
        )
    for name, tensor in projector.items():
        if tuple(tensor.shape) != tuple(have[name].shape):
            raise WeightsError(
                f"{source}: {name} is {tuple(tensor.shape)}, the model's {tuple(have[name].shape)}"
            )
    return {**state, **{prefix + k: v for k, v in projector.items()}}


def load_llava(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    projector: str | Path | None = None,
) -> LlavaTokensModel:
    """The LLaVA-1.5 model of a llava-hf checkpoint directory, in eval mode; ``projector``: an
    ``mm_projector.bin`` (LLaVA's stage-1 output) replacing the directory's projector."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory}: not a checkpoint directory")
    config = read_llava_config(directory)
    try:
        model = LlavaTokensModel(config)
    except ValueError as exc:
        raise WeightsError(f"{directory / 'config.json'}: {exc}") from exc
    state = canonical_state(read_tensors(directory), str(directory))
    if text_config(config).tie_word_embeddings and LM_HEAD not in state and EMBED in state:
        state[LM_HEAD] = state[EMBED]  # a tied head is written once
    if projector is not None:
        state = replace_projector(state, read_mm_projector(Path(projector)), str(projector))
    check_layout(model, state, str(directory))
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()
