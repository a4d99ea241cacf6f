"""Specification of stage 2's data: instruction items resolved against the cache — by key, by
a path's file name, embedded on the fly when the cache lacks them, and text-only items with
the zero image's feature, as the release feeds them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tables import image_rows

from cachebind.config import EncoderConfig, Settings, StoreConfig, WeightsConfig
from cachebind.encode import Encoder
from cachebind.inject.prompts import format_prompt
from cachebind.store import CacheTable
from cachebind.train.instruct import InstructionError, encoder_callbacks, load_items, resolve


@pytest.fixture()
def setup(tmp_path):
    import lancedb

    vectors = F.normalize(torch.randn(6, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    lancedb.connect(str(tmp_path / "db")).create_table(
        "images", image_rows(vectors.numpy(), dtype="float32")
    )
    settings = Settings(
        store=StoreConfig(uri=str(tmp_path / "db"), table="images", vector_dtype="float32"),
        encoder=EncoderConfig(preset="tiny", device="cpu"),
        weights=WeightsConfig(dir=tmp_path / "no-weights"),
    )
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "new.png")
    return settings, CacheTable.open(settings.store), vectors.numpy(), tmp_path


def test_items_resolve_by_key_path_file_and_text(setup):
    settings, table, vectors, root = setup
    items = [
        {"image": "img-3", "conversations": [{"value": "What is it?"}, {"value": "A dog."}]},
        {"image": "coco/img-5.jpg", "conversations": [{"value": "Q"}, {"value": "A"}]},
        {"image": "new.png", "conversations": [{"value": "Colour?"}, {"value": "Red."}]},
        {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
    ]
    (root / "items.json").write_text(json.dumps(items))
    examples = resolve(load_items(root / "items.json"), table, *encoder_callbacks(settings),
                       base_dir=root)  # fmt: skip
    got = np.stack(examples.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got[0], vectors[3], rtol=1e-6)
    np.testing.assert_allclose(got[1], vectors[5], rtol=1e-6)  # by file name, no suffix
    encoder = Encoder.from_config(settings.encoder, settings.weights)
    np.testing.assert_allclose(got[2], encoder.embed("image", [(root / "new.png").read_bytes()])[0],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    blank = F.normalize(encoder.encode("image", torch.zeros(1, 3, 224, 224)), dim=-1)[0]
    np.testing.assert_allclose(got[3], blank.numpy(), rtol=1e-5, atol=1e-6)
    assert examples.column("prompt").to_pylist() == [
        format_prompt("What is it?"), format_prompt("Q"), format_prompt("Colour?"),
        format_prompt("Add 2 and 2."),
    ]  # fmt: skip
    assert examples.column("answer").to_pylist() == ["A dog.", "A", "Red.", "4"]
    assert examples.column("has_image").to_pylist() == [True, True, True, False]


def test_an_image_neither_cached_nor_a_file_is_named(setup):
    settings, table, _, root = setup
    items = [{"image": "nowhere-7", "conversations": [{"value": "Q"}, {"value": "A"}]}]
    with pytest.raises(InstructionError, match="nowhere-7"):
        resolve(items, table, *encoder_callbacks(settings), base_dir=root)
