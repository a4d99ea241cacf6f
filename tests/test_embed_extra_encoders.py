"""``embed --extra-encoder``: CLIP ViT-L/14-336 and DINOv2, loaded from their Hugging Face
layouts, write their own columns (``vector_<name>``, ``patch_tokens_<name>``) beside
ImageBind's in the same exactly-once job, each from its own preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import torch
from builders import embed_settings
from extra_checkpoints import (
    CLIP_DIM,
    CLIP_PATCHES,
    DINO_PATCHES,
    WIDTH,
    drop_tensor,
    write_clip,
    write_dinov2,
    write_whole_clip,
)
from ray_local import use_local_ray
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionModelWithProjection,
    Dinov2Model,
)

import indexing
from cachebind.cli import build_parser, overrides_from
from cachebind.config import IndexConfig, Settings, load_config
from cachebind.encode.extra import ExtraEncoder
from cachebind.errors import IndexMismatchError, WeightsError
from cachebind.preprocess.extra import extra_tensor
from cachebind.preprocess.image import load_image
from cachebind.sources import synthetic as syn
from cachebind.store import CacheTable, EncoderMismatchError, row_id
from jobs.embed import run_embed

N_IMAGES = 10


@pytest.fixture(scope="module")
def ray_session():
    use_local_ray(num_cpus=2)


def extra_settings(root: Path, table: str, **embed: Any) -> Settings:
    """Both extra encoders and --tokens; float32 vectors, to compare them at 1e-5."""
    extra = {"clip336": root / "clip", "dinov2": root / "dinov2"}
    settings = embed_settings(root / "db", table, tokens=True, **{"extra_encoders": extra, **embed})
    store = settings.store.model_copy(update={"vector_dtype": "float32"})
    return settings.model_copy(update={"store": store})


@pytest.fixture(scope="module")
def extra_table(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A table embedded with both extra encoders and --tokens through the driver's sink."""
    root = tmp_path_factory.mktemp("extra")
    write_clip(root / "clip")
    write_dinov2(root / "dinov2")
    bad = syn.bad_samples()  # each a clear error row; the good rows keep every column
    keys = syn.write_webdataset(root / "wds", N_IMAGES, per_shard=4, bad=bad)
    settings = extra_settings(root, "whole", sink="driver")
    report = run_embed(str(root / "wds"), settings, progress=False)
    assert (report.rows_written, report.errors_written) == (N_IMAGES, len(bad))
    return {"root": root, "settings": settings, "ids": [row_id(k) for k in keys]}


def column(table: CacheTable, name: str, ids: list[int]) -> np.ndarray:
    """Column ``name`` of rows ``ids`` as float32 [len(ids), values a row]."""
    offsets = table.present_offsets(ids)
    values = table.dataset.take(offsets.tolist(), columns=[name])[name]
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return flat.reshape(len(ids), -1)


def published_pixels(name: str) -> torch.Tensor:
    """The synthetic images as the encoder's published preprocessor_config.json prepares
    them, through transformers' own image processor (the oracle of ``extra_tensor``)."""
    if name == "clip336":
        processor: Any = CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        )
    else:  # facebook/dinov2-*'s preprocessor_config.json
        processor = BitImageProcessor(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
            do_convert_rgb=True,
        )
    images = [load_image(syn.image_bytes(i)) for i in range(N_IMAGES)]
    return torch.as_tensor(np.asarray(processor(images, return_tensors="np")["pixel_values"]))


def test_each_encoders_preprocessing_is_its_published_image_processors(extra_table):
    for name in ("clip336", "dinov2"):
        ours = torch.stack(
            [extra_tensor(load_image(syn.image_bytes(i)), name) for i in range(N_IMAGES)]
        )
        theirs = published_pixels(name)
        assert ours.shape == theirs.shape == (N_IMAGES, 3, *ours.shape[-2:])
        # Both resize with Pillow's bicubic: equal up to float32 rounding of the normalisation.
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_the_jobs_extra_vectors_and_tokens_are_transformers_own_outputs(extra_table):
    root, ids = extra_table["root"], extra_table["ids"]
    table = CacheTable.open(extra_table["settings"].store)
    clip = CLIPVisionModelWithProjection.from_pretrained(root / "clip").eval()
    dino = Dinov2Model.from_pretrained(root / "dinov2").eval()
    for name, model, patches in (("clip336", clip, CLIP_PATCHES), ("dinov2", dino, DINO_PATCHES)):
        pixels = torch.stack(
            [extra_tensor(load_image(syn.image_bytes(i)), name) for i in range(N_IMAGES)]
        )
        with torch.no_grad():
            out = model(pixel_values=pixels, output_hidden_states=True)
        glob = out.image_embeds if name == "clip336" else out.pooler_output
        want = torch.nn.functional.normalize(glob, dim=-1).numpy()
        got = column(table, f"vector_{name}", ids)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        tokens = table.patch_tokens(ids, encoder=name).astype(np.float32)
        assert tokens.shape == (N_IMAGES, patches, WIDTH)
        want_tokens = out.hidden_states[-2][:, 1:].numpy()  # LLaVA's layer, CLS dropped
        step = float(np.abs(want_tokens).max()) * 2.0**-10  # one float16 rounding step
        assert np.abs(tokens - want_tokens).max() <= step
    assert table.table.schema.field("vector_clip336").type.list_size == CLIP_DIM
    assert table.table.schema.field("vector_dinov2").type.list_size == WIDTH
    recorded = table.metadata["extra_encoders"]
    assert recorded["clip336"]["architecture"] == "CLIPVision"
    assert recorded["dinov2"]["preprocess"]["center_crop"] == 224
    assert recorded["clip336"]["tokens"]["patches"] == CLIP_PATCHES
    assert all(r["weights"].startswith("sha256:") for r in recorded.values())
    with pytest.raises(ValueError, match="no patch_tokens_clip"):
        table.patch_tokens(ids, encoder="clip")


def resumed_errors(settings: Settings) -> int:
    """Distinct ids in the table's errors table."""
    db = lancedb.connect(settings.store.uri)
    ids = db.open_table(settings.store.errors_table_name).to_arrow()["id"].to_pylist()
    assert len(ids) == len(set(ids))  # each bad sample recorded once
    return len(ids)


def test_a_resumed_job_writes_every_column_of_every_row_exactly_once(extra_table):
    root, whole = extra_table["root"], extra_table["settings"]
    source = str(root / "wds")
    resumed = extra_settings(root, "resumed")  # the workers' sink
    partial = run_embed(source, resumed, limit=1, progress=False, flush_rows=2)
    assert partial.stopped_by_limit and 0 < partial.rows_written < N_IMAGES
    run_embed(source, resumed, progress=False)
    a = CacheTable.open(whole.store).table.to_arrow().sort_by("id")
    b = CacheTable.open(resumed.store).table.to_arrow().sort_by("id")
    assert b.num_rows == N_IMAGES and len(set(b["id"].to_pylist())) == N_IMAGES
    assert resumed_errors(resumed) == resumed_errors(whole) == len(syn.bad_samples())
    names = [n for n in a.column_names if n.startswith(("vector", "patch_tokens"))]
    assert set(names) >= {"vector_clip336", "patch_tokens_dinov2"}
    for name in ("id", "key", *names):
        assert a[name].equals(b[name]), name


def test_a_table_keeps_its_extra_encoders(extra_table):
    root = extra_table["root"]
    source = str(root / "wds")
    with pytest.raises(EncoderMismatchError, match="extra_encoders"):
        run_embed(source, extra_settings(root, "whole", extra_encoders={}), progress=False)
    other = write_dinov2(root / "dinov2-other", seed=7)
    settings = extra_settings(root, "whole")
    settings.embed.extra_encoders["dinov2"] = other
    with pytest.raises(EncoderMismatchError, match="extra_encoders"):
        run_embed(source, settings, progress=False)
    assert CacheTable.open(extra_table["settings"].store).count() == N_IMAGES


def test_a_checkpoint_missing_a_tensor_is_refused_by_name_before_any_work(tmp_path):
    write_clip(tmp_path / "clip")
    write_dinov2(tmp_path / "dinov2")
    drop_tensor(tmp_path / "clip", "visual_projection.weight")
    syn.write_webdataset(tmp_path / "wds", 2, per_shard=2)
    with pytest.raises(WeightsError, match="missing keys.*visual_projection.weight"):
        run_embed(str(tmp_path / "wds"), extra_settings(tmp_path, "t"), progress=False)
    assert not (tmp_path / "db").exists() or not list((tmp_path / "db").iterdir())


def test_a_directory_of_another_model_type_is_refused_naming_both(tmp_path):
    write_dinov2(tmp_path / "clip")  # a DINOv2 where CLIP is expected
    write_dinov2(tmp_path / "dinov2")
    syn.write_webdataset(tmp_path / "wds", 2, per_shard=2)
    with pytest.raises(WeightsError, match="model_type is 'dinov2'; clip336 takes"):
        run_embed(str(tmp_path / "wds"), extra_settings(tmp_path, "t"), progress=False)


def cli_settings(*argv: str) -> Settings:
    return load_config(None, **overrides_from(build_parser().parse_args(list(argv))))


def test_extra_encoder_and_index_column_flags_become_settings():
    settings = cli_settings(
        "embed", "src", "--extra-encoder", "clip336=/m/clip", "--extra-encoder", "dinov2=/m/d"
    )
    assert settings.embed.extra_encoders == {"clip336": Path("/m/clip"), "dinov2": Path("/m/d")}
    assert cli_settings("index", "--column", "vector_dinov2").index.column == "vector_dinov2"
    assert cli_settings("index").index.column == "vector"  # the default path is ImageBind's
    for bad in ("clip336", "resnet=/m/r"):
        with pytest.raises(ValueError, match="NAME=DIR|clip336"):
            cli_settings("embed", "src", "--extra-encoder", bad)
    with pytest.raises(ValueError, match="given twice"):
        cli_settings("embed", "src", "--extra-encoder", "dinov2=/a", "--extra-encoder", "dinov2=/b")
    with pytest.raises(ValueError, match="column"):
        cli_settings("index", "--column", "thumbnail")


def test_an_index_over_an_extra_column_finds_the_image_its_encoder_encodes(extra_table, tmp_path):
    root, ids, store = extra_table["root"], extra_table["ids"], extra_table["settings"].store
    cfg = IndexConfig(dir=tmp_path / "index", use_gpu="no", column="vector_dinov2")
    dinov2 = CacheTable.open(store, column="vector_dinov2")
    with pytest.raises(ValueError, match="index.column is 'vector_dinov2'"):
        indexing.build(CacheTable.open(store), cfg)  # a handle of ImageBind's column
    manifest = indexing.build(dinov2, cfg, indexing.BuildOptions(progress=False))
    assert manifest["dim"] == WIDTH and manifest["table"]["column"] == "vector_dinov2"
    assert {s["name"] for s in manifest["query_sets"]} == {"image:held_out"}
    loaded = indexing.load_current(cfg.dir, dinov2, use_gpu="no")
    encoder = ExtraEncoder.load("dinov2", root / "dinov2")
    for i in (0, 4, N_IMAGES - 1):
        pixels = extra_tensor(load_image(syn.image_bytes(i)), "dinov2")[None]
        query, _ = encoder.encode(pixels)
        scores, found = loaded.search(query.numpy(), k=3)
        assert found[0, 0] == ids[i] and scores[0, 0] > scores[0, 1]
    # The service's handle reads ImageBind's column: another encoder's index is refused.
    with pytest.raises(IndexMismatchError, match="'vector_dinov2' vectors, but they are read"):
        indexing.load_current(cfg.dir, CacheTable.open(store), use_gpu="no")
    with pytest.raises(ValueError, match="no column 'vector_clip'.*vector_clip336"):
        CacheTable.open(store, column="vector_clip")


def test_a_whole_clip_models_directory_gives_its_vision_tower_and_projection(tmp_path):
    model = write_whole_clip(tmp_path / "clip")
    encoder = ExtraEncoder.load("clip336", tmp_path / "clip")
    pixels = torch.stack([extra_tensor(load_image(syn.image_bytes(i)), "clip336") for i in (0, 1)])
    got, _ = encoder.encode(pixels)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=pixels)
    want = getattr(want, "pooler_output", want)  # a tensor, or an output holding it
    torch.testing.assert_close(got, torch.nn.functional.normalize(want, dim=-1), rtol=0, atol=1e-5)
    # Run one image at a time, the same vectors and tokens as the batch.
    whole, tokens = encoder.encode(pixels, -2)
    one_by_one, tokens_one = encoder.encode(pixels, -2, batch_size=1)
    assert tokens is not None and tokens_one is not None and tokens.shape[0] == 2
    torch.testing.assert_close(one_by_one, whole, rtol=0, atol=1e-6)
    step = float(tokens.float().abs().max()) * 2.0**-10  # one float16 rounding step
    assert float((tokens_one.float() - tokens.float()).abs().max()) <= step
