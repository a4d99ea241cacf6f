"""SPHINX's mixed-embedding projector over cached encoders: the encoders' tokens, resampled to
one grid, concatenated channel by channel in a recorded order and projected to the LLM width; a
stage-1 step from the cached tokens equals the step from the encoders' own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from extra_checkpoints import CLIP_PATCHES, DINO_PATCHES, WIDTH, write_clip, write_dinov2
from train_fixtures import tokens_table
from transformers import LlamaConfig, LlamaForCausalLM

from cachebind.bind.mixed import MixedProjector, TokenSource, resample_grid
from cachebind.encode.extra import ExtraEncoder
from cachebind.store import CacheTable, row_id
from cachebind.train.tokens_data import IMAGE_INDEX, pad_examples
from cachebind.train.tokens_step import LLAVA_IGNORE, stage1_step

SOURCES = [TokenSource("clip336", CLIP_PATCHES, WIDTH), TokenSource("dinov2", DINO_PATCHES, 16)]


def test_tokens_of_two_grids_become_one_grid_of_concatenated_channels_in_the_recorded_order():
    projector = MixedProjector(SOURCES, text_dim=40, side=4)
    assert projector.channel_order == [("clip336", 0, WIDTH), ("dinov2", WIDTH, WIDTH + 16)]
    assert projector.visual_proj[0].in_features == WIDTH + 16  # Linear, then LayerNorm
    assert isinstance(projector.visual_proj[1], torch.nn.LayerNorm)
    clip = torch.randn(2, CLIP_PATCHES, WIDTH)  # a 6 x 6 grid
    dino = torch.randn(2, DINO_PATCHES, 16)  # a 4 x 4 grid
    flat = torch.cat([clip.reshape(2, -1), dino.reshape(2, -1)], dim=1)
    parts = projector.split(flat)
    assert torch.equal(parts[0], clip) and torch.equal(parts[1], dino)
    mixed = projector.mix(parts)
    assert mixed.shape == (2, 16, WIDTH + 16)
    assert torch.equal(mixed[..., WIDTH:], dino)  # already on the grid: untouched
    # A map constant over the grid stays that constant when resampled.
    constant = torch.arange(WIDTH, dtype=torch.float32).expand(2, CLIP_PATCHES, WIDTH)
    torch.testing.assert_close(resample_grid(constant, 4), constant[:, :16])
    assert projector(flat).shape == (2, 16, 40)
    with pytest.raises(ValueError, match="give 1408"):
        projector(flat[:, :-1])
    with pytest.raises(ValueError, match="not a square grid"):
        MixedProjector([TokenSource("odd", 5, 8)], text_dim=40)


def fp16_step(x: torch.Tensor) -> float:
    return float(x.abs().max()) * 2.0**-10


def test_a_step_from_cached_tokens_equals_the_step_from_the_encoders_outputs(tmp_path):
    clip = ExtraEncoder.load("clip336", write_clip(tmp_path / "clip"))
    dino = ExtraEncoder.load("dinov2", write_dinov2(tmp_path / "dino"))
    g = torch.Generator().manual_seed(0)
    n = 3
    _, clip_tokens = clip.encode(torch.randn(n, 3, 336, 336, generator=g), layer=-2)
    _, dino_tokens = dino.encode(torch.randn(n, 3, 224, 224, generator=g), layer=-2)
    assert clip_tokens is not None and dino_tokens is not None
    (tmp_path / "db").mkdir()
    store = tokens_table(
        tmp_path / "db",
        {"clip336": clip_tokens.numpy(), "dinov2": dino_tokens.numpy()},
        ["a red circle"] * n,
    )
    table = CacheTable.open(store)
    ids = [row_id(f"img-{i}") for i in range(n)]
    cached = [torch.from_numpy(table.patch_tokens(ids, encoder=s)) for s in ("clip336", "dinov2")]
    assert (cached[0] - clip_tokens).abs().max() <= fp16_step(clip_tokens)

    sources = [
        TokenSource("clip336", CLIP_PATCHES, WIDTH),
        TokenSource("dinov2", DINO_PATCHES, WIDTH),
    ]
    side = 4
    rows = [([1, *[IMAGE_INDEX] * side**2, 5, 6, 7], [LLAVA_IGNORE] * (1 + side**2) + [5, 6, 7])]
    input_ids, labels = pad_examples(rows * n, pad_id=0)
    results = []
    for parts in (cached, [clip_tokens, dino_tokens]):
        torch.manual_seed(0)
        projector = MixedProjector(sources, text_dim=32, side=side)
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=50, tie_word_embeddings=False,
        )  # fmt: skip
        llm = LlamaForCausalLM(config)
        optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-3)
        flat = torch.cat([p.reshape(n, -1) for p in parts], dim=1)
        results.append(stage1_step(projector, llm, optimizer, flat, input_ids, labels, IMAGE_INDEX))
    (loss_cache, grads_cache), (loss_fresh, grads_fresh) = results
    assert np.isfinite(loss_cache) and abs(loss_cache - loss_fresh) <= 1e-4 * loss_fresh
    assert set(grads_cache) == {"visual_proj.0.weight", "visual_proj.0.bias",
                                "visual_proj.1.weight", "visual_proj.1.bias"}  # fmt: skip
    for name, grad in grads_cache.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, grads_fresh[name], rtol=0, atol=1e-3 * scale)
