"""Small random CLIP ViT (with projection) and DINOv2 checkpoints in their Hugging Face layout:
what transformers' ``save_pretrained`` writes (``config.json`` + ``model.safetensors``), the
layout of openai/clip-vit-large-patch14-336's vision tower and facebook/dinov2-*."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
)

# Big patches keep the models small at the encoders' real input sizes (336 and 224 px).
CLIP_PATCH, DINO_PATCH = 56, 56
CLIP_PATCHES, DINO_PATCHES = (336 // CLIP_PATCH) ** 2, (224 // DINO_PATCH) ** 2
WIDTH, CLIP_DIM = 32, 24


def write_clip(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=336,
        patch_size=CLIP_PATCH,
        projection_dim=CLIP_DIM,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(directory)
    return directory


def write_dinov2(directory: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=224,
        patch_size=DINO_PATCH,
    )
    Dinov2Model(config).save_pretrained(directory)
    return directory


def drop_tensor(directory: Path, name: str) -> None:
    """Remove tensor ``name`` from the directory's ``model.safetensors``."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_whole_clip(directory: Path, seed: int = 2) -> CLIPModel:
    """A whole CLIP model (text and vision towers), as openai/clip-vit-large-patch14-336 ships."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
        vision_config={"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 336, "patch_size": CLIP_PATCH},
        projection_dim=CLIP_DIM,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    return model
