"""``embed --tokens``: each image's patch tokens cached (float16) beside its vector by the same
exactly-once job, and one LLaVA-1.5 stage-1 step from the cached tokens equal to the same step
through the encoder."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from builders import embed_settings
from ray_local import use_local_ray
from transformers import LlamaConfig, LlamaForCausalLM

from cachebind.bind.projector import LlavaProjector
from cachebind.config import EncoderConfig, Settings
from cachebind.encode import Encoder
from cachebind.inject.placement import expand_image_placeholders
from cachebind.preprocess.image import image_tensor, load_image
from cachebind.sources import synthetic as syn
from cachebind.store import CacheTable, EncoderMismatchError, row_id
from cachebind.train.tokens_step import LLAVA_IGNORE, frozen, stage1_step
from jobs.embed import run_embed

N_IMAGES = 12
PATCHES, WIDTH = 256, 64  # the tiny preset's vision trunk at 224 px (16 x 16 patches of 14)


@pytest.fixture(scope="module")
def ray_session():
    use_local_ray(num_cpus=2)


@pytest.fixture(scope="module")
def tokens_table(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A table embedded with --tokens through the driver's sink, with its source and ids."""
    root = tmp_path_factory.mktemp("tokens")
    keys = syn.write_webdataset(root / "wds", N_IMAGES, per_shard=4)
    settings = embed_settings(root / "db", "whole", tokens=True, sink="driver")
    report = run_embed(str(root / "wds"), settings, progress=False)
    assert report.rows_written == N_IMAGES
    return {"root": root, "settings": settings, "ids": [row_id(k) for k in keys]}


def through_the_encoder(ids: list[int]) -> tuple[np.ndarray, torch.Tensor]:
    """Vectors and -2 patch tokens of the synthetic images, in one process (no cache)."""
    encoder = Encoder.from_config(EncoderConfig(preset="tiny"), Settings().weights)
    pixels = torch.stack([image_tensor(load_image(syn.image_bytes(i))) for i in range(len(ids))])
    feats, tokens = encoder.encode_image_tokens(pixels, -2)
    return torch.nn.functional.normalize(feats, dim=-1).numpy(), tokens


def fp16_step(x: np.ndarray | torch.Tensor) -> float:
    """One float16 rounding step at the largest magnitude of ``x`` (2^-10 relative)."""
    return float(np.abs(np.asarray(x, dtype=np.float32)).max()) * 2.0**-10


def test_a_tokens_job_stores_each_images_patch_tokens_beside_its_vector(tokens_table):
    table = CacheTable.open(tokens_table["settings"].store)
    assert table.table.schema.field("patch_tokens").type == pa.list_(pa.float16(), PATCHES * WIDTH)
    assert table.metadata["tokens"] == {
        "layer": -2, "patches": PATCHES, "width": WIDTH, "dtype": "float16", "cls": False
    }  # fmt: skip
    ids = tokens_table["ids"]
    want_vectors, want_tokens = through_the_encoder(ids)
    cached = table.patch_tokens(ids)
    assert cached.shape == (N_IMAGES, PATCHES, WIDTH) and cached.dtype == np.float16
    # Batches of another size may round a value to the neighbouring float16: one step at most.
    diff = np.abs(cached.astype(np.float32) - want_tokens.float().numpy())
    assert diff.max() <= fp16_step(want_tokens)
    np.testing.assert_allclose(table.vectors(ids), want_vectors, atol=2e-3)
    # Distinct images have distinct tokens (the column is not a constant).
    assert np.abs(cached[0].astype(np.float32) - cached[1].astype(np.float32)).max() > 0.1


def test_a_resumed_tokens_job_writes_exactly_the_same_rows_and_the_table_keeps_its_setting(
    tokens_table,
):
    root, whole = tokens_table["root"], tokens_table["settings"]
    source = str(root / "wds")
    resumed = embed_settings(root / "db", "resumed", tokens=True)  # the workers' sink
    # limit=1 stops after the first block, whatever its size (4 or 8 rows here).
    partial = run_embed(source, resumed, limit=1, progress=False, flush_rows=2)
    assert partial.stopped_by_limit and 0 < partial.rows_written < N_IMAGES
    run_embed(source, resumed, progress=False)
    a = CacheTable.open(whole.store).table.to_arrow().sort_by("id")
    b = CacheTable.open(resumed.store).table.to_arrow().sort_by("id")
    for name in ("id", "key", "vector", "patch_tokens"):
        assert a[name].equals(b[name]), name

    with pytest.raises(EncoderMismatchError, match="tokens"):
        run_embed(source, embed_settings(root / "db", "whole"), progress=False)
    with pytest.raises(ValueError, match="token layer 9 is outside"):
        run_embed(
            source,
            embed_settings(root / "db", "other", tokens=True, tokens_layer=9),
            progress=False,
        )
    assert CacheTable.open(whole.store).count() == N_IMAGES


def caption_batch(n: int, image_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA's stage-1 layout: BOS, the image's tokens, a caption, EOS; only the caption and
    EOS are labelled."""
    g = torch.Generator().manual_seed(5)
    ids, labels = [], []
    for _ in range(n):
        caption = torch.randint(3, image_token, (6,), generator=g).tolist()
        row = expand_image_placeholders([1, image_token, *caption, 2], image_token, PATCHES)
        ids.append(row)
        labels.append([LLAVA_IGNORE] * (1 + PATCHES) + caption + [2])
    return torch.tensor(ids), torch.tensor(labels)


def stage1_models() -> tuple[LlavaProjector, LlamaForCausalLM]:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=50, max_position_embeddings=300, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return LlavaProjector(WIDTH, 32), LlamaForCausalLM(config)


def test_one_stage_1_step_from_cached_tokens_equals_the_step_through_the_encoder(tokens_table):
    ids = tokens_table["ids"][:4]
    cached = torch.from_numpy(CacheTable.open(tokens_table["settings"].store).patch_tokens(ids))
    _, fresh = through_the_encoder(tokens_table["ids"])
    input_ids, labels = caption_batch(len(ids), image_token=49)

    results = []
    for tokens in (cached, fresh[: len(ids)]):
        projector, llm = stage1_models()
        optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-3)
        before = {k: v.clone() for k, v in projector.state_dict().items()}
        loss, grads = stage1_step(projector, llm, optimizer, tokens, input_ids, labels, 49)
        assert frozen(llm) and all(p.grad is None for p in llm.parameters())
        assert set(grads) == {"linear_1.weight", "linear_1.bias", "linear_2.weight",
                              "linear_2.bias"}  # fmt: skip
        moved = [not torch.equal(before[k], v) for k, v in projector.state_dict().items()]
        assert all(moved)  # the step trained the projector
        results.append((loss, grads))

    (loss_cache, grads_cache), (loss_encoder, grads_encoder) = results
    assert np.isfinite(loss_cache) and loss_cache > 0
    # Tokens equal up to one float16 step give losses and gradients equal to float32 noise
    # at their own scale.
    assert abs(loss_cache - loss_encoder) <= 1e-4 * loss_encoder
    for name, grad in grads_cache.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(grad, grads_encoder[name], rtol=0, atol=1e-3 * scale)
