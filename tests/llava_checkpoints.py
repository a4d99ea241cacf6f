"""Small random LLaVA-1.5 models and checkpoint directories in the llava-hf layout.

The reference is transformers' own ``LlavaForConditionalGeneration``: the directory is what its
``save_pretrained`` writes, or (``published=True``) the same tensors under the names of the
published llava-hf checkpoints, whose vision tower is nested as ``vision_tower.vision_model.*``.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from cachebind.inject.tiny import train_tokenizer

IMAGE_TOKEN = 99
VOCAB = 100
IMAGE_SIZE = 42  # 3 x 3 patches of 14 px
PATCHES = 9


def small_llava_config(
    strategy: str = "default", vocab: int = VOCAB, image_token: int = IMAGE_TOKEN
) -> LlavaConfig:
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
        image_token_id=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        image_seq_length=PATCHES,
    )
    config.text_config._attn_implementation = "eager"
    return config


def reference_llava(
    seed: int = 0, strategy: str = "default", vocab: int = VOCAB, image_token: int = IMAGE_TOKEN
) -> LlavaForConditionalGeneration:
    """transformers' LLaVA with random weights (biases and norms too, so none is trivially 0/1)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(small_llava_config(strategy, vocab, image_token)).eval()
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


def write_served_llava(
    directory: Path, seed: int = 0
) -> tuple[Path, LlavaForConditionalGeneration]:
    """A llava-hf directory that ``cachebind serve`` loads in llava mode: the small random
    model with a vocabulary of the tiny sentencepiece tokenizer's pieces plus ``<image>`` (the
    id after them, as llava-hf adds it), and that ``tokenizer.model``."""
    tok = train_tokenizer(directory / "tokenizer.model", seed=seed)
    pieces = spm.SentencePieceProcessor(model_file=str(tok)).vocab_size()
    reference = reference_llava(seed, vocab=pieces + 1, image_token=pieces)
    write_llava_hf(reference, directory)
    # llava-hf's processor settings (CLIP's at 336 px) at the small tower's size.
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop).save_pretrained(
        directory
    )
    return directory, reference
