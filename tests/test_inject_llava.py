"""Specification of LLaVA-1.5's tokens path: the same logits as transformers' LLaVA, the visual
tokens where ``<image>`` stands, and llava-hf checkpoint directories loaded strictly."""

from __future__ import annotations

import json

import pytest
import torch
from llava_checkpoints import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    PATCHES,
    edit_tensors,
    reference_llava,
    write_llava_hf,
)
from safetensors.torch import save_file

from cachebind.errors import WeightsError
from cachebind.inject.llava_load import load_llava
from cachebind.inject.placement import expand_image_placeholders, place_visual_tokens

TOLERANCE = 1e-4


def prompts() -> torch.Tensor:
    """Two rows whose ``<image>`` stands at different places, expanded to one id per patch."""
    first = [1, 5, 6, IMAGE_TOKEN, 7, 8, 9, 10]
    second = [1, IMAGE_TOKEN, 11, 12, 13, 14, 15, 16]
    rows = [expand_image_placeholders(r, IMAGE_TOKEN, PATCHES) for r in (first, second)]
    return torch.tensor(rows)


def pixels(images: int = 2) -> torch.Tensor:
    return torch.randn(
        images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3)
    )


@pytest.mark.parametrize("published", [False, True], ids=["as-saved", "published-names"])
def test_the_llava_path_gives_transformers_logits_from_the_same_checkpoint(tmp_path, published):
    reference = reference_llava()
    ours = load_llava(write_llava_hf(reference, tmp_path / "ckpt", published=published))
    ids, images = prompts(), pixels()
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=images).logits
        got = ours(ids, pixel_values=images).logits
    assert got.shape == expected.shape == (2, ids.shape[1], 100)
    assert (got - expected).abs().max() <= TOLERANCE


def test_keeping_the_cls_token_full_strategy_also_matches_transformers(tmp_path):
    reference = reference_llava(strategy="full")
    ours = load_llava(write_llava_hf(reference, tmp_path / "ckpt"))
    assert ours.tokens_per_image == PATCHES + 1
    row = expand_image_placeholders([1, 4, IMAGE_TOKEN, 5], IMAGE_TOKEN, PATCHES + 1)
    ids, images = torch.tensor([row]), pixels(1)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=images).logits
        got = ours(ids, pixel_values=images).logits
    assert (got - expected).abs().max() <= TOLERANCE


def test_cached_patch_tokens_give_the_same_logits_as_pixels(tmp_path):
    ours = load_llava(write_llava_hf(reference_llava(), tmp_path / "ckpt"))
    ids, images = prompts(), pixels()
    cached = ours.patch_tokens(images)
    assert cached.shape == (2, PATCHES, 32)  # the second-to-last layer, CLS dropped
    with torch.no_grad():
        assert torch.equal(ours(ids, patch_tokens=cached).logits, ours(ids, images).logits)


def test_visual_tokens_land_where_image_stands_and_text_embeddings_stay(tmp_path):
    reference = reference_llava()
    ours = load_llava(write_llava_hf(reference, tmp_path / "ckpt"))
    ids, images = prompts(), pixels()
    with torch.no_grad():
        visual = ours.visual_tokens(ours.patch_tokens(images))
        text = ours.language_model.get_input_embeddings()(ids)
        placed = place_visual_tokens(text, ids, IMAGE_TOKEN, visual)
        # transformers' own projected features, in its own order.
        hf_visual = reference.model.get_image_features(pixel_values=images).pooler_output
    assert torch.allclose(torch.stack(list(hf_visual)), visual, atol=TOLERANCE)
    # Row 0: <image> after three text tokens; row 1: right after BOS.
    assert torch.equal(placed[0, 3 : 3 + PATCHES], visual[0])
    assert torch.equal(placed[1, 1 : 1 + PATCHES], visual[1])
    is_text = ids != IMAGE_TOKEN
    assert torch.equal(placed[is_text], text[is_text])


def test_a_prompt_whose_image_positions_do_not_match_the_images_is_refused():
    embeds = torch.zeros(1, 6, 4)
    ids = torch.tensor([[1, IMAGE_TOKEN, IMAGE_TOKEN, 2, 3, 4]])
    with pytest.raises(ValueError, match="2 image-token positions but 1 image"):
        place_visual_tokens(embeds, ids, IMAGE_TOKEN, torch.ones(1, 3, 4))


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (
            lambda t: {k: v for k, v in t.items() if k != "multi_modal_projector.linear_2.bias"},
            "missing keys (1): multi_modal_projector.linear_2.bias",
        ),
        (
            lambda t: {**t, "multi_modal_projector.linear_3.weight": torch.zeros(2, 2)},
            "unexpected keys (1): multi_modal_projector.linear_3.weight",
        ),
        (
            lambda t: {**t, "multi_modal_projector.linear_1.weight": torch.zeros(48, 31)},
            "multi_modal_projector.linear_1.weight: checkpoint (48, 31) vs model (48, 32)",
        ),
    ],
    ids=["missing", "extra", "wrong-shape"],
)
def test_a_checkpoint_that_differs_by_one_tensor_is_refused_naming_it(tmp_path, edit, named):
    directory = write_llava_hf(reference_llava(), tmp_path / "ckpt")
    edit_tensors(directory, edit)
    with pytest.raises(WeightsError) as caught:
        load_llava(directory)
    assert named in str(caught.value)


def test_a_sharded_checkpoint_with_older_writers_buffers_loads_and_gives_the_same_logits(
    tmp_path,
):
    reference = reference_llava()
    directory = tmp_path / "ckpt"
    reference.save_pretrained(directory, max_shard_size="100KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1 and (directory / "model.safetensors.index.json").is_file()
    # transformers 4.x saved CLIP's position ids; they are recomputed, not loaded.
    save_file(
        {"vision_tower.vision_model.embeddings.position_ids": torch.arange(10)[None]},
        str(directory / "model-extra.safetensors"),
    )
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["vision_tower.vision_model.embeddings.position_ids"] = (
        "model-extra.safetensors"
    )
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    ours = load_llava(directory)
    ids, images = prompts(), pixels()
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=images).logits
        assert (ours(ids, pixel_values=images).logits - expected).abs().max() <= TOLERANCE


def test_an_index_naming_a_file_outside_its_directory_is_refused(tmp_path):
    directory = tmp_path / "ckpt"
    reference_llava().save_pretrained(directory, max_shard_size="100KB")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="is not a file of"):
        load_llava(directory)


def test_a_directory_without_a_llava_config_is_refused_with_the_reason(tmp_path):
    directory = write_llava_hf(reference_llava(), tmp_path / "ckpt")
    (directory / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(WeightsError, match="model_type is 'llama', not 'llava'"):
        load_llava(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot read the model configuration"):
        load_llava(directory)
