"""SPHINX's mixed visual embedding served in tokens mode: each image encoded by several frozen
encoders (ImageBind's vision trunk, CLIP ViT-L/14-336, DINOv2), their patch tokens resampled
to one grid and concatenated channel by channel, projected by the ``MixedProjector`` that
``train llava-pretrain`` (``tokens_train.mix``) learnt on the cache, and placed where
``<image>`` stands in a LLaMA's prompt.

The projector file records, for each encoder, the hidden state its tokens are and the encoder's
identity as the cache recorded them. Loading refuses an encoder whose weights are not the
recorded ones (a projector learnt on one DINOv2 says nothing about another's tokens), and the
service refuses cached rows recorded from another layer or encoder; so fresh and cached images
reach the LLM as the projector learnt them. The image positions hold LLaVA's
IMAGE_TOKEN_INDEX (-200), as in training: no piece of the tokenizer can forge one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM

from cachebind.bind.mixed import MixedProjector, TokenSource, load_mixed_projector
from cachebind.config import LLMConfig
from cachebind.device import resolve_device, resolve_dtype
from cachebind.errors import WeightsError
from cachebind.inject.llava_prompt import IMAGE_INDEX
from cachebind.inject.llava_serve import TokensGenerator, positions
from cachebind.inject.tokenizer import Tokenizer
from cachebind.preprocess.extra import IMAGEBIND_PREPROCESS, ExtraPreprocess

log = logging.getLogger(__name__)

TOKEN_DTYPE = torch.float16
"""What the cache stores: fresh tokens are rounded to it too, as in training."""


@dataclass(frozen=True)
class MixedEncoder:
    """One loaded encoder of a mixed projector: which source it feeds, the image transform it
    takes, its hidden states' count, and ``tokens`` (pixels [n, 3, H, W] -> [n, P, C])."""

    source: TokenSource
    spec: ExtraPreprocess
    states: int
    tokens: Callable[[torch.Tensor], torch.Tensor]


class MixedGenerator(TokensGenerator):
    """A LLaMA with SPHINX's mixed embedding in front: ``token_shape`` is the encoders' tokens
    one after the other, flattened (``MixedProjector``'s input)."""

    model_name = "sphinx-mixed"

    def __init__(
        self,
        language_model: LlamaForCausalLM,
        tokenizer: Tokenizer,
        projector: MixedProjector,
        encoders: Sequence[MixedEncoder],
        *,
        max_seq_len: int,
        seed: int | None = None,
    ) -> None:
        if [e.source.name for e in encoders] != [s.name for s in projector.sources]:
            raise ValueError("one loaded encoder per projector source, in its order")
        hidden = int(language_model.config.hidden_size)
        proj = projector.visual_proj[0]
        assert isinstance(proj, nn.Linear)
        if proj.out_features != hidden:
            raise WeightsError(
                f"the mixed projector gives {proj.out_features}-wide tokens; the LLM is "
                f"{hidden} wide"
            )
        super().__init__(
            language_model,
            tokenizer,
            image_token_id=IMAGE_INDEX,
            tokens_per_image=projector.side**2,
            max_seq_len=max_seq_len,
            seed=seed,
        )
        self.projector = projector.to(self.device, self.model.dtype).eval()
        self.encoders = tuple(encoders)
        self.pixel_specs = tuple(e.spec for e in self.encoders)
        self.token_shape = (projector.input_size,)

    @property
    def sources(self) -> tuple[TokenSource, ...]:
        return self.projector.sources

    def encode(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [
            e.tokens(x).to(TOKEN_DTYPE).reshape(x.shape[0], -1)
            for e, x in zip(self.encoders, pixels, strict=True)
        ]
        return torch.cat(parts, dim=1)

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each source's cached tokens [n, P_i, C_i] -> the projector's input [n, sum P_i·C_i]."""
        return torch.cat([p.to(TOKEN_DTYPE).reshape(p.shape[0], -1) for p in parts], dim=1)

    def visual_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        tokens = patches.to(TOKEN_DTYPE).to(device=self.device, dtype=self.model.dtype)
        return self.projector(tokens)


def load_language_model(
    llm_cfg: LLMConfig, dtype: torch.dtype, device: torch.device
) -> tuple[LlamaForCausalLM, Path]:
    """The LLaMA of ``llm.llava_dir`` (a llava-hf directory's language model) or else of
    ``llm.llama_dir`` (a transformers LLaMA directory), and its ``tokenizer.model``."""
    if llm_cfg.llava_dir is not None:
        from cachebind.inject.llava_load import load_llava

        directory = Path(llm_cfg.llava_dir)
        model = load_llava(directory, dtype=dtype, device=device).language_model
    elif llm_cfg.llama_dir is not None:
        directory = Path(llm_cfg.llama_dir)
        model = load_transformers_llama(directory, dtype, device)
    else:
        raise WeightsError("llm.mixed_projector needs an LLM: llm.llava_dir or llm.llama_dir")
    tokenizer = directory / "tokenizer.model"
    if not tokenizer.is_file():
        raise WeightsError(f"{directory} has no sentencepiece tokenizer.model")
    return model, tokenizer


def load_transformers_llama(
    directory: Path, dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM:
    """A transformers LLaMA/Vicuna directory (``config.json`` with ``model_type: llama``)."""
    path = directory / "config.json"
    try:
        kind = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise WeightsError(
            f"{path}: cannot read a transformers LLaMA configuration ({exc})"
        ) from exc
    if kind != "llama":
        raise WeightsError(f"{path}: model_type is {kind!r}, not 'llama'")
    model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=dtype)
    nn.Module.to(model, device)  # in place; transformers' typing of ``to`` is narrower
    return model


def recorded_differences(recorded: str | None, loaded: dict[str, Any]) -> dict[str, tuple]:
    """``{field: (recorded, loaded)}`` where the loaded encoder is not the recorded one (the
    fields the record holds; nothing when it records none)."""
    was = json.loads(recorded) if recorded else None
    if not isinstance(was, dict):
        return {}
    return {k: (v, loaded.get(k)) for k, v in was.items() if loaded.get(k) != v}


def refuse_other_encoder(source: TokenSource, differ: dict[str, tuple], where: str) -> None:
    if differ:
        detail = "; ".join(f"{k}: learnt on {a}, loaded {b}" for k, (a, b) in differ.items())
        raise WeightsError(
            f"{source.name} ({where}) is not the encoder the mixed projector learnt on: {detail}"
        )


def check_token_shape(source: TokenSource, patches: int, width: int, where: str) -> None:
    if (patches, width) != (source.patches, source.width):
        raise WeightsError(
            f"{source.name} ({where}) gives {patches} x {width} tokens; the mixed projector "
            f"learnt on {source.patches} x {source.width}"
        )


def recorded_layer(source: TokenSource) -> int:
    """The hidden state ``source``'s tokens are (``load_mixed_projector`` refuses a file that
    records none)."""
    if source.layer is None:
        raise WeightsError(f"{source.name}: the mixed projector records no token layer")
    return source.layer


def trunk_encoder(source: TokenSource, trunk: Any) -> MixedEncoder:
    """ImageBind's vision trunk (the served ``encode.Encoder``) as a mixed source."""
    from cachebind.store.identity import differences

    if trunk is None:
        raise WeightsError("the mixed projector takes ImageBind's tokens: no encoder is loaded")
    recorded = json.loads(source.identity) if source.identity else None
    if isinstance(recorded, dict):  # the fields a table's encoder must agree on
        refuse_other_encoder(source, differences(dict(trunk.identity), recorded), "served")
    patches, width = trunk.model.vision_token_shape()
    check_token_shape(source, patches, width, "served")
    layer = recorded_layer(source)
    states = int(trunk.model.token_state(-1)) + 1
    return MixedEncoder(
        source, IMAGEBIND_PREPROCESS, states, lambda x: trunk.encode_image_tokens(x, layer)[1]
    )


def extra_encoder(source: TokenSource, directory: Path | None, device: str) -> MixedEncoder:
    """An extra encoder (``embed.extra_encoders[name]``) as a mixed source, its weights
    checked against the ones the cache recorded."""
    from cachebind.encode.extra import ExtraEncoder, extra_identity, read_config

    if directory is None:
        raise WeightsError(
            f"the mixed projector takes {source.name}'s tokens: set "
            f"embed.extra_encoders.{source.name} to its checkpoint directory"
        )
    encoder = ExtraEncoder.load(source.name, directory, device)
    identity = extra_identity(source.name, Path(directory), read_config(source.name, directory))
    refuse_other_encoder(source, recorded_differences(source.identity, identity), str(directory))
    check_token_shape(source, encoder.shape.patches, encoder.shape.width, str(directory))
    layer = recorded_layer(source)

    def tokens(pixels: torch.Tensor) -> torch.Tensor:
        _, patch_tokens = encoder.encode(pixels, layer)
        assert patch_tokens is not None  # asked for a layer
        return patch_tokens

    return MixedEncoder(source, encoder.preprocess, encoder.shape.hidden_states, tokens)


def load_mixed_generator(
    llm_cfg: LLMConfig,
    extra_dirs: dict[str, Path],
    trunk: Any = None,
    *,
    seed: int | None = None,
) -> MixedGenerator:
    """The mixed projector of ``llm.mixed_projector`` with its encoders (the served ImageBind
    ``trunk``; ``extra_dirs``, i.e. ``embed.extra_encoders``) and the configured LLM."""
    if llm_cfg.mixed_projector is None:
        raise WeightsError("no llm.mixed_projector to serve")
    start = time.perf_counter()
    projector = load_mixed_projector(Path(llm_cfg.mixed_projector))
    device = resolve_device(llm_cfg.device)
    dtype = resolve_dtype(llm_cfg.dtype, device, gpu_default=torch.float16)
    language_model, tokenizer = load_language_model(llm_cfg, dtype, device)
    encoders = [
        trunk_encoder(s, trunk)
        if s.name == "imagebind"
        else extra_encoder(s, extra_dirs.get(s.name), str(device))
        for s in projector.sources
    ]
    generator = MixedGenerator(
        language_model,
        Tokenizer(tokenizer),
        projector,
        encoders,
        max_seq_len=positions(llm_cfg, language_model.config),
        seed=seed,
    )
    names = "+".join(s.name for s in projector.sources)
    log.info("loaded a mixed projector over %s in %.1f s", names, time.perf_counter() - start)
    return generator
