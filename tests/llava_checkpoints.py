"""Small random LLaVA-1.5 models and checkpoint directories in the llava-hf layout.

The reference is transformers' own ``LlavaForConditionalGeneration``: the directory is what its
``save_pretrained`` writes, or (``published=True``) the same tensors under the names of the
published llava-hf checkpoints, whose vision tower is nested as ``vision_tower.vision_model.*``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 99
VOCAB = 100
IMAGE_SIZE = 42  # 3 x 3 patches of 14 px
PATCHES = 9


def small_llava_config(strategy: str = "default", vocab: int = VOCAB) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        image_seq_length=PATCHES,
    )
    config.text_config._attn_implementation = "eager"
    return config


def reference_llava(
    seed: int = 0, strategy: str = "default", vocab: int = VOCAB
) -> LlavaForConditionalGeneration:
    """transformers' LLaVA with random weights (biases and norms too, so none is trivially 0/1)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(small_llava_config(strategy, vocab)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def write_llava_hf(
    reference: LlavaForConditionalGeneration, directory: Path, published: bool = False
) -> Path:
    """``reference`` saved by transformers into ``directory`` (published=True: the tower's
    tensors renamed to the published ``vision_tower.vision_model.*`` spelling)."""
    reference.save_pretrained(directory)
    if published:
        path = directory / "model.safetensors"
        tensors = load_file(str(path))
        renamed = {
            k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
            for k, v in tensors.items()
        }
        save_file(renamed, str(path), metadata={"format": "pt"})
    return directory


def edit_tensors(directory: Path, edit) -> None:
    """Rewrite the directory's ``model.safetensors`` through ``edit(dict) -> dict``."""
    path = directory / "model.safetensors"
    save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})
