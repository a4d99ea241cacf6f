"""Small random LLaVA-1.5 models and checkpoint directories in the llava-hf layout.

The reference is transformers' own ``LlavaForConditionalGeneration``: the directory is what its
``save_pretrained`` writes, or (``published=True``) the same tensors under the names of the
published llava-hf checkpoints, whose vision tower is nested as ``vision_tower.vision_model.*``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import sentencepiece as spm
import torch
from builders import DemoCache, demo_rows
from fixtures_media import image_bytes
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from cachebind.config import StoreConfig
from cachebind.inject.tiny import train_tokenizer
from cachebind.preprocess.extra import spec_tensor
from cachebind.store import connect, images_schema

IMAGE_TOKEN = 99
VOCAB = 100
IMAGE_SIZE = 42  # 3 x 3 patches of 14 px
PATCHES = 9


def small_llava_config(
    strategy: str = "default",
    vocab: int = VOCAB,
    image_token: int = IMAGE_TOKEN,
    positions: int = 128,
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
        max_position_embeddings=positions,
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
    seed: int = 0,
    strategy: str = "default",
    vocab: int = VOCAB,
    image_token: int = IMAGE_TOKEN,
    positions: int = 128,
) -> LlavaForConditionalGeneration:
    """transformers' LLaVA with random weights (biases and norms too, so none is trivially 0/1)."""
    torch.manual_seed(seed)
    config = small_llava_config(strategy, vocab, image_token, positions)
    model = LlavaForConditionalGeneration(config).eval()
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
    # 4096 positions: room for generations long enough to hold every slot a while.
    reference = reference_llava(seed, vocab=pieces + 1, image_token=pieces, positions=4096)
    write_llava_hf(reference, directory)
    # llava-hf's processor settings (CLIP's at 336 px) at the small tower's size.
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop).save_pretrained(
        directory
    )
    return directory, reference


CACHED_IMAGES = (image_bytes(size=(64, 48), seed=5), image_bytes(size=(50, 70), seed=9))
"""Images a served llava table holds the tower's tokens of (rows 0 and 1); resized and
centre-cropped to the small tower's 42 px."""
RECORDED = {"layer": -2, "patches": PATCHES, "width": 32, "dtype": "float16", "cls": False}
"""What ``embed --tokens --extra-encoder clip336=DIR`` records of the small tower's tokens."""


def write_tokens_cache(root: Path, generator: Any, rows: int = 12) -> DemoCache:
    """A table in the embedding job's layout whose ``patch_tokens_clip336`` are the served
    model's tower's tokens (float16): row i < 2 of ``CACHED_IMAGES[i]``, the rest random."""
    base = demo_rows(0, rows, 64, seed=0)
    pixels = torch.stack(
        [spec_tensor(Image.open(io.BytesIO(b)), generator.preprocess) for b in CACHED_IMAGES]
    )
    with torch.no_grad():
        known = generator.llava.patch_tokens(pixels).to(torch.float16).numpy()
    rng = np.random.default_rng(0)
    rest = rng.standard_normal((rows - len(known), *known.shape[1:])).astype(np.float16)
    tokens = np.concatenate([known, rest]).reshape(rows, -1)
    vectors = rng.standard_normal((rows, 8)).astype(np.float16)
    schema = images_schema(
        dtype="float16",
        dim=64,
        extra={"clip336": (8, tokens.shape[1])},
        metadata={"encoder": "fixture", "extra_encoders": {"clip336": {"tokens": RECORDED}}},
    )
    columns = {name: base[name] for name in base.schema.names}
    columns["vector_clip336"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8)
    columns["patch_tokens_clip336"] = pa.FixedSizeListArray.from_arrays(
        pa.array(tokens.ravel()), tokens.shape[1]
    )
    store = StoreConfig(uri=str(root / "lancedb"), table="images")
    connect(store).create_table(store.table, pa.table(columns, schema=schema), mode="overwrite")
    return DemoCache(store=store, dim=64, rows=rows)
