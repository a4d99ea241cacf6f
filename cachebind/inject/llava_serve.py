"""LLaVA-1.5 (tokens mode) as the scheduler serves it: the LLM behind the scheduler's model
interface, the prompt ids with the image positions, and the prefill's input embeddings.

The scheduler (``inject.scheduler``) owns a model that it calls as ``model(ids, visual=None,
attention_mask=, position_ids=, past_key_values=, logits_to_keep=)`` with its per-slot KV cache;
``LlavaLM`` is LLaVA's ``language_model`` behind that call, so LLaVA rows decode as text like
any row. What differs is the prefill: a row with images is prefilled from input embeddings, the
text embeddings of its ids with its visual tokens (tower -> projector, or cached patch tokens ->
projector) at the image-token positions (``LlavaGenerator.prompt_embeds``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from cachebind.config import LLMConfig
from cachebind.device import resolve_device, resolve_dtype
from cachebind.errors import InputError, WeightsError
from cachebind.inject.generate import Generator, load_generator
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
    """One image of a prompt: decoded pixels [3, H, W], or its patch tokens read from the
    cache [tokens, width] (the encoder step already done)."""

    pixels: torch.Tensor | None = None
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
        """Images from decoded pixels [n, 3, H, W]."""
        return cls(tuple(PromptImage(pixels=p) for p in pixels))

    @classmethod
    def of_tokens(cls, tokens: torch.Tensor) -> PromptImages:
        """Images from cached patch tokens [n, tokens, width]."""
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


class LlavaLM(torch.nn.Module):
    """LLaVA's LLM in the scheduler's model interface (``cfg``, ``dtype``, ``device``, call)."""

    def __init__(self, llava: LlavaTokensModel, max_seq_len: int) -> None:
        super().__init__()
        self.llava = llava
        tc = text_config(llava.config)
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
    def dtype(self) -> torch.dtype:
        return self.llava.multi_modal_projector.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llava.multi_modal_projector.linear_1.weight.device

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
            raise ValueError("LLaVA takes visual tokens in the prompt, not an adapter query")
        return cast(
            CausalLMOutputWithPast,
            self.llava.language_model(
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
        raise ValueError("LLaVA takes visual tokens in the prompt, not an adapter query F~_M")

    def adapter_terms(self, t_i: torch.Tensor) -> torch.Tensor:
        raise ValueError("LLaVA takes visual tokens in the prompt, not adapter terms")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings of ``ids`` [B, S] -> [B, S, dim]."""
        return cast(torch.Tensor, self.llava.language_model.get_input_embeddings()(ids))


class LlavaGenerator:
    """A loaded LLaVA-1.5 for the scheduler: model, tokenizer, prompts and image inputs."""

    visual_dim = None  # no F~_M: images enter as tokens (``PromptImages``)
    mode = "llava"

    def __init__(
        self,
        llava: LlavaTokensModel,
        tokenizer: Tokenizer,
        preprocess: ExtraPreprocess,
        *,
        max_seq_len: int,
        seed: int | None = None,
    ) -> None:
        if llava.image_token_id < tokenizer.n_words:
            raise WeightsError(
                f"image_token_id {llava.image_token_id} is a piece of the tokenizer "
                f"({tokenizer.n_words} pieces): text could forge image positions"
            )
        self.llava = llava.eval()
        self.model = LlavaLM(self.llava, max_seq_len)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_seq_len = max_seq_len
        self.seed = seed
        self._tower = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.device

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

    def prompt_ids(self, prompt: str, *, template: bool, images: PromptImages | None) -> list[int]:
        """The prompt's ids: in the LLaVA-1.5 template (its images first) unless ``template``
        is off, in which case ``prompt`` holds one ``<image>`` per image where it stands."""
        n = images.count if images is not None else 0
        text = llava_prompt(prompt, n) if template else prompt
        return llava_ids(
            self.tokenizer, text, n, self.llava.image_token_id, self.llava.tokens_per_image
        )

    def check_images(self, images: PromptImages) -> None:
        """Refuse images whose shape is not what this model's tower takes or gives."""
        tokens = (self.llava.tokens_per_image, self.layout.width)
        want: tuple[int, ...]
        for i, image in enumerate(images.images):
            if image.pixels is not None:
                want, got, what = self.preprocess.shape, tuple(image.pixels.shape), "pixels"
            else:
                assert image.patch_tokens is not None
                want, got, what = tokens, tuple(image.patch_tokens.shape), "patch tokens"
            if got != want:
                detail = f"image {i}: {what} {list(got)}; the model takes {list(want)}"
                raise InputError("images", "wrong_shape", detail)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen tower's patch tokens of decoded pixels [n, 3, H, W] -> [n, tokens,
        width] (CPU), one call at a time: the service runs it on a request's thread, so that
        the scheduler's steps never wait for a tower forward."""
        with self._tower, torch.inference_mode():
            return self.llava.patch_tokens(pixels.to(self.device)).cpu()

    def prompt_embeds(self, ids: list[int], images: PromptImages) -> torch.Tensor:
        """Input embeddings [S, dim] of a prompt: text embeddings, with the images' visual
        tokens at the image-token positions (the tower runs here for pixels, once for all of
        the prompt's decoded images; cached tokens skip it)."""
        device = self.device
        row = torch.tensor([ids], device=device)
        decoded = [im.pixels for im in images.images if im.pixels is not None]
        encoded: Iterator[torch.Tensor] = iter(
            self.llava.patch_tokens(torch.stack(decoded).to(device)) if decoded else []
        )
        patches = [
            next(encoded) if im.patch_tokens is None else im.patch_tokens.to(device)
            for im in images.images
        ]
        visual = self.llava.visual_tokens(torch.stack([p.float() for p in patches]))
        embeds = place_visual_tokens(self.model.embed(row), row, self.llava.image_token_id, visual)
        return embeds[0]


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


def load_served_llm(llm_cfg: LLMConfig, *, seed: int | None = None) -> Generator | LlavaGenerator:
    """The LLM that ``llm.mode`` names: LLaMA + adapter, or LLaVA-1.5."""
    if llm_cfg.mode == "llava":
        return load_llava_generator(llm_cfg, seed=seed)
    return load_generator(llm_cfg, seed=seed)


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
    limit = int(getattr(text_config(llava.config), "max_position_embeddings", 0) or 0)
    max_seq_len = min(llm_cfg.llava_max_seq_len, limit) if limit else llm_cfg.llava_max_seq_len
    image_size = int(cast(int, vision_config(llava.config).image_size))
    preprocess = read_preprocess(directory, image_size)
    log.info("loaded LLaVA-1.5 in %.1f s (%s, %s)", time.perf_counter() - start, device, dtype)
    return LlavaGenerator(llava, tokenizer, preprocess, max_seq_len=max_seq_len, seed=seed)
