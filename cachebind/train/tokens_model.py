"""The model a LLaVA-1.5 training run trains: a ``LlavaProjector`` and a ``LlamaForCausalLM``.

The LLM comes from a llava-hf directory (``inject.llava_load.load_llava``, its vision tower
dropped: the tokens come from the cache) or from a transformers LLaMA/Vicuna directory (stage 1
with a fresh projector, as LLaVA-1.5 starts from Vicuna-v1.5). Stage 1 trains the projector
alone; stage 2 the projector and the whole LLM (LLaVA's ``finetune.sh``, no LoRA).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import LlamaForCausalLM

from cachebind.bind.mixed import MixedProjector, TokenSource
from cachebind.bind.projector import LlavaProjector
from cachebind.errors import WeightsError
from cachebind.train.tokens_step import stage1_loss

LORA_PARAMS = (".lora_A", ".lora_B")

Stage = Literal["pretrain", "finetune"]


@dataclass(frozen=True)
class LlmSource:
    """Where the LLM comes from and what the projector must be."""

    kind: Literal["llava", "llama"]
    directory: str
    tokenizer: str
    hidden: int
    vision_width: int | None
    """The llava-hf tower's width (the projector's input); None for a bare LLaMA."""
    act: str = "gelu"
    bias: bool = True


def llm_source(llava_dir: Path | None, llama_dir: Path | None) -> LlmSource:
    """Describe the configured LLM, refusing a directory that is neither kind."""
    if llava_dir is not None:
        from cachebind.inject.llava import text_config, vision_config
        from cachebind.inject.llava_load import read_llava_config

        directory = Path(llava_dir)
        config = read_llava_config(directory)
        return LlmSource(
            "llava",
            str(directory.resolve()),
            str(_tokenizer(directory)),
            int(text_config(config).hidden_size),
            int(vision_config(config).hidden_size),
            str(config.projector_hidden_act),
            bool(config.multimodal_projector_bias),
        )
    if llama_dir is None:
        raise WeightsError("no LLM: set tokens_train.llava_dir or tokens_train.llama_dir")
    directory = Path(llama_dir)
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{path}: cannot read a transformers LLaMA configuration ({exc})"
        ) from exc
    if not isinstance(raw, dict) or raw.get("model_type") != "llama":
        kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise WeightsError(f"{path}: model_type is {kind!r}, not 'llama'")
    hidden = raw.get("hidden_size")
    if not isinstance(hidden, int) or hidden < 1:
        raise WeightsError(f"{path}: hidden_size {hidden!r} is not a positive integer")
    return LlmSource("llama", str(directory.resolve()), str(_tokenizer(directory)), hidden, None)


def _tokenizer(directory: Path) -> Path:
    path = directory / "tokenizer.model"
    if not path.is_file():
        raise WeightsError(f"{directory} has no sentencepiece tokenizer.model")
    return path


def load_llm(
    source: LlmSource, dtype: torch.dtype, device: torch.device
) -> tuple[LlamaForCausalLM, LlavaProjector | None]:
    """The source's LLM in ``dtype`` on ``device``, and a llava-hf directory's projector."""
    if source.kind == "llava":
        from cachebind.inject.llava_load import load_llava

        llava = load_llava(source.directory, dtype=dtype, device=device)  # its tower is dropped
        return llava.language_model, llava.multi_modal_projector
    from cachebind.inject.mixed_serve import load_transformers_llama

    return load_transformers_llama(Path(source.directory), dtype, device), None


def make_projector(
    source: LlmSource, width: int, mix: tuple[TokenSource, ...] = (), side: int = 0
) -> nn.Module:
    """LLaVA's projector (vision ``width`` -> LLM width), or SPHINX's over ``mix``."""
    if mix:
        return MixedProjector(mix, source.hidden, side or None)
    return LlavaProjector(width, source.hidden, act=source.act, bias=source.bias)


class TokensLoss(nn.Module):
    """``forward(patch_tokens, input_ids, labels) -> loss``: the unit DDP wraps."""

    def __init__(self, projector: nn.Module, llm: LlamaForCausalLM, image_id: int) -> None:
        super().__init__()
        self.projector = projector
        self.llm = llm
        self.image_id = image_id

    def forward(
        self, patch_tokens: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return stage1_loss(self.projector, self.llm, patch_tokens, input_ids, labels, self.image_id)


def set_stage_trainability(
    module: TokensLoss, stage: Stage, lora: bool = False
) -> dict[str, nn.Parameter]:
    """Freeze all, then train the projector (and in stage 2 the LLM, or with ``lora`` its
    adapters alone) in float32."""
    for p in module.parameters():
        p.requires_grad_(False)
    named = dict(module.named_parameters())
    if stage == "finetune" and lora:
        chosen = [n for n in named if n.startswith("projector.") or n.endswith(LORA_PARAMS)]
    else:
        prefixes = ("projector.", "llm.") if stage == "finetune" else ("projector.",)
        chosen = [n for n in named if n.startswith(prefixes)]
    trainable = {n: named[n] for n in chosen}
    for p in trainable.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return trainable


BETAS = (0.9, 0.999)  # transformers' Trainer defaults, under which LLaVA trains
EPS = 1e-8


def make_tokens_optimizer(
    trainable: dict[str, nn.Parameter],
    lr: float,
    weight_decay: float,
    projector_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW as transformers' Trainer builds it: no decay for biases and norm weights; the
    projector's groups at ``projector_scale`` times the schedule's lr (LLaVA's
    ``mm_projector_lr``), read by ``schedule.set_lr``."""
    groups: list[dict[str, Any]] = []
    for is_projector in (False, True):
        params = [p for n, p in trainable.items() if n.startswith("projector.") == is_projector]
        scale = projector_scale if is_projector else 1.0
        for decayed in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decayed]
            if chosen:
                groups.append({
                    "params": chosen, "weight_decay": weight_decay if decayed else 0.0,
                    "lr_scale": scale, "lr": lr * scale,
                })  # fmt: skip
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS)
