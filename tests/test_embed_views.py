"""``embed --views N``: augmented crops cached beside the centre vector, and training drawing
one of them per row and epoch.

The crops follow the release's training transform and are seeded per (id, view); a job with
views stores vectors equal to a single-process computation of those crops, the same rows on a
re-run and after a resume, under either sink; a views=0 table is today's table; a table keeps
its views setting; the trainer's draw is deterministic and changes across epochs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from builders import embed_settings
from ray_local import use_local_ray

from cachebind.config import EmbedConfig, EncoderConfig, Settings, StoreConfig
from cachebind.encode import Encoder
from cachebind.modalities import Modality
from cachebind.preprocess.image import image_tensor, load_image
from cachebind.preprocess.views import RATIO, SCALE, crop_box, view_rng, view_tensor
from cachebind.sources import synthetic as syn
from cachebind.store import CacheTable, TableMismatchError, images_schema, row_id
from cachebind.store.table import vectors_to_numpy
from cachebind.train.data import view_choices
from cachebind.train.rows import RowSource, stream_rows
from jobs.embed import run_embed, table_schema

N_IMAGES = 12


@pytest.fixture(scope="module")
def ray_session():
    use_local_ray(num_cpus=2)


settings = embed_settings


@pytest.fixture(scope="module")
def whole(
    ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, str, list[str]]:
    """A webdataset of ``N_IMAGES`` embedded with 2 views through the driver's sink, the source
    and its keys: the job's output several tests read (none writes to it), embedded once."""
    root = tmp_path_factory.mktemp("views")
    keys = syn.write_webdataset(root / "wds", N_IMAGES, per_shard=4)
    s = settings(root / "db", "whole", views=2, sink="driver")
    report = run_embed(str(root / "wds"), s, progress=False)
    assert report.rows_written == N_IMAGES
    return s, str(root / "wds"), keys


def by_id(s: Settings) -> dict[str, list]:
    """The table's rows sorted by id (column -> values), without the volatile nothing."""
    rows = CacheTable.open(s.store).table.to_arrow()
    return rows.sort_by("id").to_pydict()


def test_crops_follow_the_release_transform_and_are_seeded_per_id_and_view() -> None:
    for width, height in [(640, 480), (224, 224), (480, 600), (97, 80)]:
        areas, ratios = [], []
        for sid in range(200):
            box = crop_box(width, height, view_rng(sid, 0))
            assert box == crop_box(width, height, view_rng(sid, 0))  # same seed, same crop
            left, top, right, bottom = box
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            w, h = right - left, bottom - top
            areas.append(w * h / (width * height))
            ratios.append(w / h)
        # Rounding w and h to pixels moves area and ratio a little past the drawn ranges.
        slack = 2.5 / min(width, height)
        assert SCALE[0] - 2 * slack <= min(areas) and max(areas) <= SCALE[1] + 1e-9
        assert RATIO[0] - slack <= min(ratios) and max(ratios) <= RATIO[1] + slack
        assert len({round(a, 4) for a in areas}) > 20  # the draws vary across ids
    # Views of one id differ; a thin image falls back to the centre, clamped to the ratio.
    assert crop_box(640, 480, view_rng(7, 0)) != crop_box(640, 480, view_rng(7, 1))
    left, top, right, bottom = crop_box(3000, 100, view_rng(1, 0))
    assert (bottom - top, right - left) == (100, round(100 * RATIO[1]))
    assert left == (3000 - (right - left)) // 2
    assert crop_box(300, 1000, view_rng(1, 0)) == (0, 300, 300, 700)  # 300 / 400 = 0.75


def test_views_job_stores_the_crops_features_and_rewrites_the_same_rows(
    whole: tuple[Settings, str, list[str]], tmp_path: Path
) -> None:
    whole, source, keys = whole

    table = CacheTable.open(whole.store)
    field = table.table.schema.field("view_vectors")
    assert field.type == pa.list_(pa.float16(), 2 * 64)  # two 64-d vectors one after another
    assert table.metadata["views"]["count"] == 2
    assert table.metadata["views"]["augmentation"]["scale"] == [0.9, 1.0]

    # Equal to the same crops encoded in one process; the centre vector is today's.
    encoder = Encoder.from_config(EncoderConfig(preset="tiny"), Settings().weights)
    images = [load_image(syn.image_bytes(i)) for i in range(N_IMAGES)]
    ids = [row_id(k) for k in keys]

    def encode(batch: list[torch.Tensor]) -> np.ndarray:
        return F.normalize(encoder.encode(Modality.IMAGE, torch.stack(batch)), dim=-1).numpy()

    centre = encode([image_tensor(img) for img in images])
    want = np.stack(
        [
            encode([view_tensor(img, sid, v) for img, sid in zip(images, ids, strict=True)])
            for v in range(2)
        ],
        axis=1,
    )
    _, offsets = table.offsets(ids)
    got = table.dataset.take(offsets.tolist(), columns=["vector", "view_vectors"])
    np.testing.assert_allclose(table.vectors(ids), centre, atol=2e-3)
    # What indexes are built from is the centre vector alone.
    read = list(table.iter_vectors())
    index_ids = np.concatenate([i for i, _ in read])
    index_x = np.concatenate([v for _, v in read])
    assert index_x.shape == (N_IMAGES, 64)
    np.testing.assert_array_equal(index_x, table.vectors(index_ids))
    views = vectors_to_numpy(got["view_vectors"]).reshape(N_IMAGES, 2, -1)
    np.testing.assert_allclose(views, want, atol=2e-3)

    # Distinct views (where their crops differ), each close to the centre crop it varies: a
    # crop keeps >= 90% of the image. 1e-3 is ~20x the fp16 rounding of these values.
    boxes = [[crop_box(img.width, img.height, view_rng(sid, v)) for v in range(2)]
             for img, sid in zip(images, ids, strict=True)]  # fmt: skip
    assert np.abs(views - centre[:, None]).max(axis=2).min() > 1e-3
    differ = np.array([b[0] != b[1] for b in boxes])
    assert differ.sum() >= N_IMAGES - 1
    assert np.abs(views[differ, 0] - views[differ, 1]).max(axis=1).min() > 1e-3
    assert np.einsum("nvd,nd->nv", views, centre).min() > 0.9

    # A resumed job through the workers' sink writes exactly these rows.
    resumed = settings(tmp_path / "db", "resumed", views=2)
    # limit=1 stops after the first block, whatever its size (the actors' blocks hold 4 or 8
    # rows here, so a larger limit could be reached only by the last one).
    partial = run_embed(source, resumed, limit=1, progress=False, flush_rows=2)
    assert partial.stopped_by_limit and 0 < partial.rows_written < N_IMAGES
    run_embed(source, resumed, progress=False)
    a, b = by_id(whole), by_id(resumed)
    for name in ("id", "key", "vector", "view_vectors", "thumbnail"):
        assert a[name] == b[name], name

    # A table keeps its views setting: another one is refused before any work.
    for other in (0, 3):
        refused = settings(Path(whole.store.uri), "whole", views=other)
        with pytest.raises(TableMismatchError, match=f"embed.views = 2.*asks for {other}"):
            run_embed(source, refused, progress=False)
    assert CacheTable.open(whole.store).count() == N_IMAGES


@pytest.mark.usefixtures("ray_session")
def test_a_views_0_table_is_todays_table_and_refuses_views(tmp_path: Path) -> None:
    syn.write_folder(tmp_path / "folder", 3)
    s = settings(tmp_path / "db", views=0)
    run_embed(str(tmp_path / "folder"), s, progress=False)
    table = CacheTable.open(s.store)
    names = table.table.schema.names
    assert names == ["id", "key", "caption", "url", "width", "height", "shard", "vector",
                     "thumbnail"]  # fmt: skip
    assert "views" not in table.metadata
    assert images_schema(dim=64).names == images_schema(dim=64, views=0).names == names
    with pytest.raises(TableMismatchError, match="embed.views = 0.*asks for 2"):
        run_embed(str(tmp_path / "folder"), settings(tmp_path / "db", views=2), progress=False)
    with_views = table_schema(settings(tmp_path / "db", views=2), _probe(), "x")
    assert with_views.names == [*names[:-1], "view_vectors", "thumbnail"]


@pytest.mark.usefixtures("ray_session")
def test_a_sphinx_views_job_stores_the_five_views_features_and_keeps_its_view_set(
    tmp_path: Path,
) -> None:
    from cachebind.preprocess.subimages import SPHINX_AUGMENTATION, sphinx_views
    from cachebind.store import EncoderMismatchError

    n = 4
    keys = syn.write_webdataset(tmp_path / "wds", n, per_shard=n)
    source = str(tmp_path / "wds")
    s = settings(tmp_path / "db", "sphinx", views=5, view_set="sphinx", sink="driver")
    assert run_embed(source, s, progress=False).rows_written == n
    table = CacheTable.open(s.store)
    assert table.metadata["views"] == {"count": 5, "augmentation": SPHINX_AUGMENTATION}

    encoder = Encoder.from_config(EncoderConfig(preset="tiny"), Settings().weights)
    images = [load_image(syn.image_bytes(i)) for i in range(n)]
    want = np.stack(
        [
            F.normalize(
                encoder.encode(Modality.IMAGE, torch.stack(sphinx_views(img))), dim=-1
            ).numpy()
            for img in images
        ]
    )
    ids = [row_id(k) for k in keys]
    _, offsets = table.offsets(ids)
    got = table.dataset.take(offsets.tolist(), columns=["view_vectors"])
    views = vectors_to_numpy(got["view_vectors"]).reshape(n, 5, -1)
    np.testing.assert_allclose(views, want, atol=2e-3)  # fp16 storage of unit vectors

    # Random crops are another view set: the table refuses them, before any work.
    crops = settings(tmp_path / "db", "sphinx", views=5)
    with pytest.raises(EncoderMismatchError, match="views"):
        run_embed(source, crops, progress=False)
    assert CacheTable.open(s.store).count() == n


def _probe():
    from jobs.embed import probe_encoder

    return probe_encoder(EncoderConfig(preset="tiny"), Settings().weights)


@pytest.mark.usefixtures("ray_session")
def test_training_draws_a_view_per_row_and_epoch_deterministically(tmp_path: Path) -> None:
    n, views, dim = 40, 3, 8
    a = view_choices(n, seed=0, epoch=0, views=views)
    assert np.array_equal(a, view_choices(n, seed=0, epoch=0, views=views))
    assert set(a.tolist()) == set(range(views + 1))  # centre and every view are drawn
    b = view_choices(n, seed=0, epoch=1, views=views)
    assert (a != b).mean() > 0.5  # a new draw per epoch (chance agreement is 1/4)
    assert not np.array_equal(a, view_choices(n, seed=1, epoch=0, views=views))

    # A real Lance table: row i's centre is i·e0, its view k is i·e_k.
    rng = np.random.default_rng(0)
    centre = np.zeros((n, dim), dtype=np.float32)
    centre[:, 0] = np.arange(n)
    nested = np.zeros((n, views, dim), dtype=np.float32)
    for k in range(views):
        nested[:, k, k + 1] = np.arange(n)
    ds = write_views_table(tmp_path / "t.lance", centre, nested)
    source = RowSource(uri=ds.uri, version=ds.version, views=views)
    offsets = rng.permutation(n)
    picked = a[offsets]
    got = np.concatenate(
        [r["vector"] for r in stream_rows(source, offsets, 8, 0.1, choices=picked)]
    )
    axis = np.argmax(np.abs(got), axis=1)
    assert np.array_equal(axis[offsets != 0], picked[offsets != 0])  # row 0 is all zeros
    assert np.array_equal(np.abs(got).max(axis=1), offsets.astype(np.float32))
    # Without choices (train.use_views false or no views) it is the centre vector.
    plain = np.concatenate([r["vector"] for r in stream_rows(source, offsets, 8, 0.1)])
    assert np.array_equal(plain, centre[offsets])
    assert math.isclose(float(plain[:, 1:].sum()), 0.0)


def write_views_table(
    path: Path, centre: np.ndarray, views: np.ndarray, metadata: dict[str, Any] | None = None
) -> Any:
    """A Lance images table (float32, no thumbnails) of ``centre`` [n, d] and ``views``
    [n, v, d], captioned ``caption i`` (``metadata``: the table's cachebind metadata)."""
    import lance

    n, v, dim = views.shape
    schema = images_schema(dtype="float32", dim=dim, views=v, thumbnail=False, metadata=metadata)
    rows = pa.table(
        {
            "id": pa.array(np.arange(n)),
            "key": pa.array([str(i) for i in range(n)]),
            "caption": pa.array([f"caption {i}" for i in range(n)]),
            "url": pa.nulls(n, pa.string()),
            "width": pa.nulls(n, pa.int32()),
            "height": pa.nulls(n, pa.int32()),
            "shard": pa.nulls(n, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(centre.reshape(-1)), dim),
            "view_vectors": pa.FixedSizeListArray.from_arrays(pa.array(views.reshape(-1)), v * dim),
        }
    ).cast(schema)
    return lance.write_dataset(rows, str(path))


def views_table(
    path: Path, n: int, views: int, dim: int, seed: int = 0, metadata: dict | None = None
) -> tuple[Any, ...]:
    """A Lance images table with random unit ``vector`` and ``view_vectors`` and captions."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, views + 1, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    return write_views_table(path, x[:, 0], x[:, 1:], metadata), x


@pytest.mark.usefixtures("ray_session")
def test_training_batches_carry_the_drawn_view_on_any_worker_count(tmp_path: Path) -> None:
    from cachebind.inject.tiny import train_tokenizer
    from cachebind.inject.tokenizer import Tokenizer
    from cachebind.train.data import epoch_order, worker_offsets
    from cachebind.train.loop import Plan, micro_batches

    n, views, dim, micro = 24, 2, 8, 3
    ds, x = views_table(tmp_path / "t.lance", n, views, dim)
    tok = Tokenizer(train_tokenizer(tmp_path / "tok.model", vocab_size=400))

    def plan(accum: int, world: int) -> Plan:
        spe = n // (micro * accum * world)
        return Plan(
            phase="pretrain", llama_dir="", start_file="", n_rows=n,
            source=RowSource(uri=ds.uri, version=ds.version, views=views),
            steps_per_epoch=spe, total_steps=2 * spe, epochs=2.0, warmup_epochs=0.0,
            lr=1e-3, min_lr=0.0, weight_decay=0.0, batch_size=micro, accum_iter=accum,
            max_words=32, seed=3, checkpoint_every=1, data_cpus=0.1, output_dtype="float32",
            log_file="", progress=False,
        )  # fmt: skip

    def f_m(p: Plan, rank: int, world: int, start: int = 0) -> np.ndarray:
        batches = [b for _, group in micro_batches(p, tok, rank, world, start) for b in group]
        return np.stack([b.f_m.numpy() for b in batches])  # [micro-batches, micro, d]

    one = f_m(plan(2, 1), 0, 1)
    two = [f_m(plan(1, 2), r, 2) for r in (0, 1)]
    for r in (0, 1):  # 1 worker x accum 2 == 2 workers, view draws included
        np.testing.assert_allclose(one[r::2], two[r], atol=1e-6)
    np.testing.assert_allclose(f_m(plan(2, 1), 0, 1, start=3), one[6:], atol=1e-6)  # resumed

    # Each row's F_M is the vector view_choices drew for it in that epoch.
    spe = n // (micro * 2)
    for epoch in (0, 1):
        offsets = worker_offsets(
            epoch_order(n, 3, epoch), rank=0, world=1, micro_batch=micro, accum=2
        )
        pick = view_choices(n, 3, epoch, views)[offsets]
        want = x[offsets, pick].reshape(-1, micro, dim)
        np.testing.assert_allclose(one[epoch * spe * 2 : (epoch + 1) * spe * 2], want, atol=1e-6)
    draws = np.stack([view_choices(n, 3, e, views) for e in (0, 1)])
    assert (draws[0] != draws[1]).any() and (draws > 0).any()  # views are trained on


def test_the_flags_reach_the_settings(tmp_path: Path) -> None:
    from cachebind.cli import build_parser, overrides_from
    from cachebind.config import load_config

    embed = build_parser().parse_args(["embed", str(tmp_path), "--views", "3"])
    assert load_config(None, **overrides_from(embed)).embed.views == 3
    plain = build_parser().parse_args(["embed", str(tmp_path)])
    assert load_config(None, **overrides_from(plain)).embed.views == 0
    train = build_parser().parse_args(["train", "pretrain", "--no-views"])
    assert load_config(None, **overrides_from(train)).train.use_views is False
    assert Settings().train.use_views is True  # views are used when the table has them
    with pytest.raises(ValueError):
        EmbedConfig(views=-1)


def test_views_made_by_another_augmentation_are_not_mixed() -> None:
    from cachebind.store import EncoderMismatchError
    from cachebind.store.writer import check_compatible

    def schema(augmentation: dict) -> pa.Schema:
        views = {"count": 2, "augmentation": augmentation}
        return images_schema(dim=8, views=2, metadata={"encoder": "e", "views": views})

    same = {"transform": "RandomResizedCrop", "scale": [0.9, 1.0]}
    check_compatible(schema(same), schema(dict(same)), "t")
    with pytest.raises(EncoderMismatchError, match="views"):
        check_compatible(schema(same), schema({**same, "scale": [0.08, 1.0]}), "t")


def test_the_trainer_reads_views_when_the_table_has_them(tmp_path: Path) -> None:
    from train_fixtures import tiny_llama, train_settings

    from cachebind.train.trainer import make_plan

    views_table(tmp_path / "db" / "images.lance", 12, 2, 16)
    store = StoreConfig(uri=str(tmp_path / "db"), table="images", vector_dtype="float32")
    llama = tiny_llama(tmp_path / "llama", dim=16, n_layers=1, n_heads=2)
    on = make_plan(train_settings(tmp_path, store, llama), "pretrain", world=1)
    assert on.source.views == 2
    off = make_plan(train_settings(tmp_path, store, llama, use_views=False), "pretrain", world=1)
    assert off.source.views == 0


def test_the_trainer_does_not_draw_sphinx_quarters_as_an_epochs_image(tmp_path: Path) -> None:
    from train_fixtures import tiny_llama, train_settings

    from cachebind.preprocess.views import augmentation
    from cachebind.train.trainer import make_plan

    recorded = {"count": 5, "augmentation": augmentation("sphinx")}
    views_table(tmp_path / "db" / "images.lance", 12, 5, 16, metadata={"views": recorded})
    store = StoreConfig(uri=str(tmp_path / "db"), table="images", vector_dtype="float32")
    llama = tiny_llama(tmp_path / "llama", dim=16, n_layers=1, n_heads=2)
    plan = make_plan(train_settings(tmp_path, store, llama), "pretrain", world=1)
    assert plan.source.views == 0  # each row's F_M is its whole-image vector


@pytest.mark.slow
def test_a_ray_train_run_on_a_table_embedded_with_views_trains_on_the_views(
    whole: tuple[Settings, str, list[str]], tmp_path: Path
) -> None:
    """embed --views 2, then stage 1 on that table through Ray Train: the run draws the views
    (its parameters differ from the same run on centre vectors only; the draw's seeding is
    specified above) and the output loads for generation."""
    from train_fixtures import tiny_llama, train_settings

    from cachebind.config import LLMConfig
    from cachebind.inject.generate import load_generator
    from cachebind.train.trainer import run_training

    embedded = whole[0]
    llama = tiny_llama(tmp_path / "llama")

    def train(run_name: str, **train: Any) -> dict[str, torch.Tensor]:
        s = train_settings(tmp_path, embedded.store, llama, run_name=run_name, **train)
        result = run_training(s, "pretrain")
        assert result.steps == N_IMAGES // 2  # batch 2, one epoch
        llm = LLMConfig(llama_dir=llama, adapter_checkpoint=result.output, dtype="float32")
        load_generator(llm.model_copy(update={"device": "cpu"}))
        return torch.load(result.output, map_location="cpu", weights_only=True)["model"]

    # The draw itself is reproducible (specified above, per row and epoch); here the run must
    # train on it: the same run on centre vectors only ends elsewhere.
    with_views, centre_only = train("views"), train("centre", use_views=False)
    assert with_views.keys() == centre_only.keys()
    moved = [n for n in with_views if not torch.equal(with_views[n], centre_only[n])]
    assert any(n.startswith("image_bind_proj") for n in moved)
