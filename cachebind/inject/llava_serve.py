"""Tokens mode as the scheduler serves it (LLaVA-1.5; SPHINX's mixed embedding in
``inject.mixed_serve``): the LLM behind the scheduler's model interface, the prompt ids with
the image positions, and the prefill's input embeddings.

The scheduler (``inject.scheduler``) owns a model that it calls as ``model(ids, visual=None,
attention_mask=, position_ids=, past_key_values=, logits_to_keep=)`` with its per-slot KV cache;
``TokensLM`` is the LLaMA behind that call, so image rows decode as text like any row. What
differs is the prefill: a row with images is prefilled from input embeddings, the text
embeddings of its ids with its visual tokens (encoders -> projector, or cached patch tokens ->
projector) at the image-token positions (``TokensGenerator.prompt_embeds``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from cachebind.config import LLMConfig
from cachebind.device import resolve_device, resolve_dtype
from cachebind.errors import InputError, WeightsError
from cachebind.inject.llava import LlavaTokensModel, text_config, vision_config
from cachebind.inject.llava_load import load_llava
from cachebind.inject.llava_prompt import llava_ids, llava_prompt
from cachebind.inject.model import AdapterLlamaConfig
from cachebind.inject.placement import place_visual_tokens
from cachebind.inject.tokenizer import Tokenizer
from cachebind.preprocess.extra import ExtraPreprocess
from cachebind.preprocess.image import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptImage:
    """One image of a prompt: its decoded pixels, one [3, H, W] tensor per transform the
    model's encoders take (``TokensGenerator.pixel_specs``), or its patch tokens read from the
    cache (the encoder step already done), in the shape ``TokensGenerator.token_shape``."""

    pixels: tuple[torch.Tensor, ...] | None = None
    patch_tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.pixels is None) == (self.patch_tokens is None):
            raise ValueError("give pixels or patch tokens")


@dataclass(frozen=True)
class PromptImages:
    """The images of one prompt, in the order of their ``<image>`` positions."""

    images: tuple[PromptImage, ...]

    @classmethod
    def of_pixels(cls, pixels: torch.Tensor) -> PromptImages:
        """Images from decoded pixels [n, 3, H, W] (a model with one encoder)."""
        return cls(tuple(PromptImage(pixels=(p,)) for p in pixels))

    @classmethod
    def of_tokens(cls, tokens: torch.Tensor) -> PromptImages:
        """Images from cached patch tokens [n, ...token_shape]."""
        return cls(tuple(PromptImage(patch_tokens=t) for t in tokens))

    @property
    def count(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class TokenLayout:
    """What one image's patch tokens are for this model's tower: the hidden state, the CLS
    choice and the shape [patches, width] (a cache's recorded tokens must be these)."""

    layer: int
    cls: bool
    patches: int
    width: int


class TokensLM(torch.nn.Module):
    """A LLaMA in the scheduler's model interface (``cfg``, ``dtype``, ``device``, call), for
    models whose images enter the prompt as visual tokens."""

    def __init__(self, language_model: LlamaForCausalLM, max_seq_len: int) -> None:
        super().__init__()
        self.language_model = language_model
        tc = language_model.config
        heads = int(tc.num_attention_heads)
        head_dim = getattr(tc, "head_dim", None)
        if head_dim is not None and int(head_dim) * heads != int(tc.hidden_size):
            raise WeightsError(f"head_dim {head_dim} x {heads} heads is not the LLM's width")
        # The slot cache sizes K and V from the adapter config's shape fields: the LLM's.
        self.cfg = AdapterLlamaConfig(
            dim=int(tc.hidden_size),
            n_layers=int(tc.num_hidden_layers),
            n_heads=heads,
            n_kv_heads=int(tc.num_key_value_heads or heads),
            vocab_size=int(tc.vocab_size),
            max_seq_len=max_seq_len,
        )

    @property
    def _embedding(self) -> torch.nn.Module:
        return self.language_model.get_input_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        return cast(torch.dtype, self._embedding.weight.dtype)

    @property
    def device(self) -> torch.device:
        return cast(torch.device, self._embedding.weight.device)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        visual: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        logits_to_keep: int = 0,
        visual_rows: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        terms: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` or of ``inputs_embeds`` (a prefill with visual tokens)."""
        if visual is not None or terms is not None:
            raise ValueError("this model takes visual tokens in the prompt, not an adapter query")
        return cast(
            CausalLMOutputWithPast,
            self.language_model(
                input_ids=None if inputs_embeds is not None else input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            ),
        )

    def visual_query(self, f_m: torch.Tensor) -> torch.Tensor:
        raise ValueError("this model takes visual tokens in the prompt, not an adapter query F~_M")

    def adapter_terms(self, t_i: torch.Tensor) -> torch.Tensor:
        raise ValueError("this model takes visual tokens in the prompt, not adapter terms")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings of ``ids`` [B, S] -> [B, S, dim]. A negative id (LLaVA's
        IMAGE_TOKEN_INDEX, -200) is a visual position: any row stands in, it is overwritten."""
        return cast(torch.Tensor, self._embedding(ids.clamp(min=0)))


class TokensGenerator:
    """A loaded tokens-mode model for the scheduler: an LLM, its tokenizer and prompts, and
    the visual path that turns an image into the tokens placed where ``<image>`` stands.

    The visual path is the subclass's: ``pixel_specs`` (the image transforms its encoders
    take), ``encode`` (pixels -> patch tokens, the cacheable step), ``visual_tokens``
    (patch tokens -> the LLM's width) and ``token_shape`` (one image's patch tokens)."""

    visual_dim = None  # no F~_M: images enter as tokens (``PromptImages``)
    mode = "llava"
    model_name = "tokens"
    pixel_specs: tuple[ExtraPreprocess, ...]
    token_shape: tuple[int, ...]

    def __init__(
        self,
        language_model: LlamaForCausalLM,
        tokenizer: Tokenizer,
        *,
        image_token_id: int,
        tokens_per_image: int,
        max_seq_len: int,
        seed: int | None = None,
    ) -> None:
        if 0 <= image_token_id < tokenizer.n_words:
            raise WeightsError(
                f"image_token_id {image_token_id} is a piece of the tokenizer "
                f"({tokenizer.n_words} pieces): text could forge image positions"
            )
        self.model = TokensLM(language_model.eval(), max_seq_len)
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_seq_len = max_seq_len
        self.seed = seed
        self._encoder_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch tokens [n, ...token_shape] of n images, given as one [n, 3, H, W] stack per
        ``pixel_specs`` entry."""
        raise NotImplementedError

    def visual_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens [n, ...token_shape] -> visual tokens [n, tokens_per_image, dim]."""
        raise NotImplementedError

    def prompt_ids(self, prompt: str, *, template: bool, images: PromptImages | None) -> list[int]:
        """The prompt's ids: in the LLaVA-1.5 template (its images first) unless ``template``
        is off, in which case ``prompt`` holds one ``<image>`` per image where it stands."""
        n = images.count if images is not None else 0
        text = llava_prompt(prompt, n) if template else prompt
        return llava_ids(self.tokenizer, text, n, self.image_token_id, self.tokens_per_image)

    def check_images(self, images: PromptImages) -> None:
        """Refuse images whose shape is not what this model's encoders take or give."""
        for i, image in enumerate(images.images):
            if image.pixels is not None:
                want: object = [list(spec.shape) for spec in self.pixel_specs]
                got: object = [list(p.shape) for p in image.pixels]
                what = "pixels"
            else:
                assert image.patch_tokens is not None
                want, got = list(self.token_shape), list(image.patch_tokens.shape)
                what = "patch tokens"
            if got != want:
                detail = f"image {i}: {what} {got}; the model takes {want}"
                raise InputError("images", "wrong_shape", detail)

    def encode_images(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """``encode`` on the CPU, one call at a time: the service runs it on a request's
        thread, so that the scheduler's steps never wait for an encoder forward."""
        with self._encoder_lock, torch.inference_mode():
            return self.encode(pixels).cpu()

    def prompt_embeds(self, ids: list[int], images: PromptImages) -> torch.Tensor:
        """Input embeddings [S, dim] of a prompt: text embeddings, with the images' visual
        tokens at the image-token positions (the encoders run here for pixels, once for all
        of the prompt's decoded images; cached tokens skip them)."""
        device = self.device
        row = torch.tensor([ids], device=device)
        decoded = [im.pixels for im in images.images if im.pixels is not None]
        stacks = [torch.stack(group).to(device) for group in zip(*decoded, strict=True)]
        encoded: Iterator[torch.Tensor] = iter(self.encode(stacks) if decoded else [])
        patches = [
            (next(encoded) if im.patch_tokens is None else im.patch_tokens).to(device)
            for im in images.images
        ]
        visual = self.visual_tokens(torch.stack(patches))
        embeds = place_visual_tokens(self.model.embed(row), row, self.image_token_id, visual)
        return embeds[0]


class LlavaGenerator(TokensGenerator):
    """LLaVA-1.5: CLIP's tower (one transform, ``preprocessor_config.json``) -> its projector."""

    model_name = "llava-1.5"

    def __init__(
        self,
        llava: LlavaTokensModel,
        tokenizer: Tokenizer,
        preprocess: ExtraPreprocess,
        *,
        max_seq_len: int,
        seed: int | None = None,
    ) -> None:
        self.llava = llava.eval()
        super().__init__(
            llava.language_model,
            tokenizer,
            image_token_id=llava.image_token_id,
            tokens_per_image=llava.tokens_per_image,
            max_seq_len=max_seq_len,
            seed=seed,
        )
        self.preprocess = preprocess
        self.pixel_specs = (preprocess,)
        self.token_shape = (llava.tokens_per_image, self.layout.width)

    @property
    def layout(self) -> TokenLayout:
        vc = vision_config(self.llava.config)
        cls = self.llava.strategy == "full"
        return TokenLayout(
            self.llava.feature_layer,
            cls,
            self.llava.tokens_per_image - (1 if cls else 0),
            int(vc.hidden_size),
        )

    @property
    def tower_states(self) -> int:
        """Hidden states the tower gives (its input and each layer's output)."""
        return int(vision_config(self.llava.config).num_hidden_layers) + 1

    def encode(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        (stack,) = pixels
        return self.llava.patch_tokens(stack.to(self.device))

    def visual_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        return self.llava.visual_tokens(patches.float())


def read_preprocess(directory: Path, image_size: int) -> ExtraPreprocess:
    """The image transform of a llava-hf directory's ``preprocessor_config.json`` (a
    CLIPImageProcessor: shortest side, centre crop, mean, std); CLIP's at the tower's size
    when the file is absent. A crop other than the tower's input size is refused."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return ExtraPreprocess(image_size, image_size, CLIP_MEAN, CLIP_STD)
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
        size = raw.get("size", image_size)
        resize = int(size.get("shortest_edge", image_size) if isinstance(size, dict) else size)
        crop_raw = raw.get("crop_size", resize)
        crop = int(crop_raw.get("height", resize) if isinstance(crop_raw, dict) else crop_raw)
        mean = tuple(float(x) for x in raw.get("image_mean", CLIP_MEAN))
        std = tuple(float(x) for x in raw.get("image_std", CLIP_STD))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{path}: not an image processor configuration ({exc})") from exc
    if crop != image_size or len(mean) != 3 or len(std) != 3:
        raise WeightsError(
            f"{path}: crop {crop} with {len(mean)} means / {len(std)} stds; the tower takes "
            f"{image_size} px RGB"
        )
    return ExtraPreprocess(resize, crop, cast(Any, mean), cast(Any, std))


def positions(llm_cfg: LLMConfig, config: LlamaConfig) -> int:
    """Positions per generation: ``llm.llava_max_seq_len``, capped at the model's own limit."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    return min(llm_cfg.llava_max_seq_len, limit) if limit else llm_cfg.llava_max_seq_len


def load_llava_generator(llm_cfg: LLMConfig, *, seed: int | None = None) -> LlavaGenerator:
    """The LLaVA-1.5 of ``llm_cfg.llava_dir`` (llava-hf layout, with ``tokenizer.model``)."""
    if llm_cfg.llava_dir is None:
        raise WeightsError("llm.mode = 'llava' needs llm.llava_dir (a llava-hf directory)")
    directory = Path(llm_cfg.llava_dir)
    device = resolve_device(llm_cfg.device)
    dtype = resolve_dtype(llm_cfg.dtype, device, gpu_default=torch.float16)
    start = time.perf_counter()
    llava = load_llava(directory, dtype=dtype, device=device)
    tokenizer = Tokenizer(directory / "tokenizer.model")
    max_seq_len = positions(llm_cfg, text_config(llava.config))
    image_size = int(cast(int, vision_config(llava.config).image_size))
    preprocess = read_preprocess(directory, image_size)
    log.info("loaded LLaVA-1.5 in %.1f s (%s, %s)", time.perf_counter() - start, device, dtype)
    return LlavaGenerator(llava, tokenizer, preprocess, max_seq_len=max_seq_len, seed=seed)
