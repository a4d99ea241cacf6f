"""LLaVA-1.5 in tokens mode: CLIP ViT patch tokens -> projector -> visual tokens placed where
``<image>`` stands in the prompt -> LLaMA/Vicuna.

The three parts keep their llava-hf names (``vision_tower``, ``multi_modal_projector``,
``language_model``), so a llava-hf checkpoint's tensor names are this module's state-dict names
(see ``llava_load``). Unlike transformers' ``LlavaForConditionalGeneration`` the stages are
separate calls: ``patch_tokens`` is the frozen, cacheable encoder step, and ``forward`` takes
either pixels or patch tokens read back from a cache, which give the same logits.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from cachebind.bind.projector import LlavaProjector
from cachebind.encode.patches import STRATEGIES, SelectStrategy, clip_patch_tokens
from cachebind.inject.placement import place_visual_tokens

VISION_TYPE = "clip_vision_model"
TEXT_TYPE = "llama"


def check_llava_config(config: LlavaConfig) -> None:
    """Refuse a configuration this path does not implement, naming the field."""
    vision_type = getattr(config.vision_config, "model_type", None)
    text_type = getattr(config.text_config, "model_type", None)
    if vision_type != VISION_TYPE:
        raise ValueError(f"vision_config.model_type is {vision_type!r}; only {VISION_TYPE!r}")
    if text_type != TEXT_TYPE:
        raise ValueError(f"text_config.model_type is {text_type!r}; only {TEXT_TYPE!r}")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"vision_feature_layer {config.vision_feature_layer!r}: one layer (an int) only"
        )
    if config.vision_feature_select_strategy not in STRATEGIES:
        raise ValueError(
            f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
            f"one of {STRATEGIES}"
        )


def vision_config(config: LlavaConfig) -> CLIPVisionConfig:
    """The vision tower's sub-config (transformers types it as any sub-config)."""
    return cast(CLIPVisionConfig, config.vision_config)


def text_config(config: LlavaConfig) -> LlamaConfig:
    """The language model's sub-config."""
    return cast(LlamaConfig, config.text_config)


class LlavaTokensModel(nn.Module):
    """Vision tower + LLaVA projector + LLaMA, built from a transformers ``LlavaConfig``."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        check_llava_config(config)
        self.config = config
        self.image_token_id = int(config.image_token_id)
        self.feature_layer = int(cast(int, config.vision_feature_layer))
        self.strategy: SelectStrategy = config.vision_feature_select_strategy
        self.vision_tower = CLIPVisionModel(vision_config(config))
        self.multi_modal_projector = LlavaProjector(
            vision_config(config).hidden_size,
            text_config(config).hidden_size,
            act=config.projector_hidden_act,
            bias=config.multimodal_projector_bias,
        )
        self.language_model = LlamaForCausalLM(text_config(config))

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one image becomes (576 for ViT-L/14 at 336 px, CLS dropped)."""
        vc = vision_config(self.config)
        # CLIP's vision config holds square sizes as ints (transformers types them loosely).
        patches = (int(cast(int, vc.image_size)) // int(cast(int, vc.patch_size))) ** 2
        return patches + (1 if self.strategy == "full" else 0)

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen encoder step: [images, 3, H, W] -> [images, tokens, vision width]."""
        pixels = pixel_values.to(self.vision_tower.dtype)
        return clip_patch_tokens(self.vision_tower, pixels, self.feature_layer, self.strategy)

    def visual_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Projector: [images, tokens, vision width] -> [images, tokens, LLM width]."""
        weight = self.multi_modal_projector.linear_1.weight
        return self.multi_modal_projector(patch_tokens.to(device=weight.device, dtype=weight.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        patch_tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        """Logits for ``input_ids`` [B, S] whose image-token positions receive the visual tokens
        of ``pixel_values`` or of cached ``patch_tokens`` (one of them, or neither: text only)."""
        if pixel_values is not None and patch_tokens is not None:
            raise ValueError("give pixel_values or cached patch_tokens, not both")
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            patch_tokens = self.patch_tokens(pixel_values)
        if patch_tokens is not None:
            visual = self.visual_tokens(patch_tokens)
            embeds = place_visual_tokens(embeds, input_ids, self.image_token_id, visual)
        elif bool((input_ids == self.image_token_id).any()):
            raise ValueError("the prompt holds image tokens but no image was given")
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )
