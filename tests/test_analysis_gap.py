"""Specification of the modality-gap report on a collection with a modelled gap.

Each paired row is an image-like vector normalize(s) with a caption embedding normalize(s + g):
the same meaning s, shifted by one offset g shared by every text (the gap). The report's numbers
must equal a numpy computation written out here, and the cache blend must narrow the gap.
"""

from __future__ import annotations

import json

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from tables import image_rows

from cachebind.analysis.notebook import gap_report
from cachebind.cli import main
from cachebind.config import CacheConfig, IndexConfig, Settings, StoreConfig
from cachebind.published.querylog import QueryLog, query_log_path
from cachebind.store import CacheTable
from indexing.quality.gapsets import known_query_groups

DIM, PAIRED, UNPAIRED = 32, 240, 160
OFFSET = 0.8  # norm of the shared text offset g


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def collection(tmp_path):
    rng = np.random.default_rng(7)
    # Meanings cluster (as a real collection's do), so neighbours share meaning.
    centres = unit(rng.standard_normal((8, DIM)))
    meaning = unit(
        centres[rng.integers(0, 8, PAIRED + UNPAIRED)]
        + 0.4 * unit(rng.standard_normal((PAIRED + UNPAIRED, DIM)))
    )
    g = OFFSET * unit(rng.standard_normal(DIM))
    images = meaning.astype(np.float32)
    texts = unit(meaning[:PAIRED] + g).astype(np.float32)
    rows = image_rows(images, dtype="float32")
    text_column = pa.array(
        [t.tolist() for t in texts] + [None] * UNPAIRED, pa.list_(pa.float32(), DIM)
    )
    rows = rows.append_column("text_vector", text_column)
    lancedb.connect(str(tmp_path / "db")).create_table("images", rows, on_bad_vectors="null")
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    log = QueryLog(capacity_per_modality=1000)
    audio = unit(meaning[:50] + OFFSET * unit(rng.standard_normal(DIM))).astype(np.float32)
    log.add("audio", audio)
    log.save(query_log_path(index_dir))
    settings = Settings(
        store=StoreConfig(uri=str(tmp_path / "db"), table="images", vector_dtype="float32"),
        index=IndexConfig(dir=index_dir),
        cache=CacheConfig(k=8, t=20.0, alpha=0.5),
    )
    return settings, images, texts, audio


def numpy_blend(q, images, exclude, k, t, alpha):
    sims = q @ images.T
    for i, own in enumerate(exclude):
        if own >= 0:
            sims[i, own] = -np.inf
    top = np.argsort(-sims, axis=1)[:, :k]
    s = np.take_along_axis(sims, top, axis=1).astype(np.float64)
    w = np.exp(t * (s - s.max(1, keepdims=True)))
    w /= w.sum(1, keepdims=True)
    cache = unit(np.einsum("nk,nkd->nd", w, images[top].astype(np.float64)))
    return unit((1 - alpha) * q + alpha * cache)


def test_the_gap_numbers_equal_a_numpy_computation_and_the_blend_narrows_it(collection):
    settings, images, texts, audio = collection
    table = CacheTable.open(settings.store)
    groups = known_query_groups(table, settings.index.dir)
    report = gap_report(settings, groups)
    by_name = {r["name"]: r for r in report.numbers["query_sets"]}
    assert set(by_name) == {"text:captions", "audio:query_log"}
    assert report.numbers["image_rows"] == PAIRED + UNPAIRED

    captions = by_name["text:captions"]
    assert captions["queries"] == PAIRED
    # Before: the gap is the shared offset, seen through normalisation.
    distance = np.linalg.norm(texts.mean(0) - images.mean(0))
    assert captions["before"]["centroid_distance"] == pytest.approx(distance, rel=1e-5)
    top1 = (texts @ images.T).max(1)
    assert captions["before"]["top1"]["mean"] == pytest.approx(top1.mean(), rel=1e-5)
    assert captions["before"]["top1"]["median"] == pytest.approx(np.median(top1), rel=1e-5)
    paired = np.einsum("nd,nd->n", texts, images[:PAIRED])
    assert captions["before"]["paired_cosine"]["mean"] == pytest.approx(paired.mean(), rel=1e-5)
    # After: eq. 4 with the served k, t, alpha, a caption's own image left out.
    blended = numpy_blend(texts, images, np.arange(PAIRED), k=8, t=20.0, alpha=0.5)
    after = captions["after"]
    distance_after = np.linalg.norm(blended.mean(0) - images.mean(0))
    assert after["centroid_distance"] == pytest.approx(distance_after, rel=1e-4)
    assert after["top1"]["mean"] == pytest.approx((blended @ images.T).max(1).mean(), rel=1e-4)
    paired_after = np.einsum("nd,nd->n", blended, images[:PAIRED])
    assert after["paired_cosine"]["mean"] == pytest.approx(paired_after.mean(), rel=1e-4)
    np.testing.assert_allclose(
        captions["gap_vector_before"], texts.mean(0) - images.mean(0), atol=1e-6
    )

    # The blend narrows the gap: nearer the image centroid, its own image and the images.
    for name in ("text:captions", "audio:query_log"):
        r = by_name[name]
        assert r["after"]["centroid_distance"] < 0.75 * r["before"]["centroid_distance"]
        assert r["after"]["top1"]["mean"] > r["before"]["top1"]["mean"]
    assert after["paired_cosine"]["mean"] > captions["before"]["paired_cosine"]["mean"]
    frame = report.numbers_frame()
    assert list(frame["stage"]) == ["query", "blended"] * 2
    assert set(report.figures) == {"top1", "projection", "paired"}


def test_the_command_writes_a_self_contained_html_report_with_its_plots_and_json(
    collection, tmp_path, capsys
):
    settings, images, texts, _ = collection
    queries = tmp_path / "depth.npy"
    np.save(queries, unit(images[:30] + 0.5).astype(np.float32))
    out = tmp_path / "report"
    argv = [
        "report",
        "gap",
        "--table-uri",
        settings.store.uri,
        "--index-dir",
        str(settings.index.dir),
        "--queries",
        f"depth={queries}",
        "--out",
        str(out),
        "--k",
        "8",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "text:captions" in printed and "depth:file:depth.npy" in printed
    numbers = json.loads((out / "gap.json").read_text())
    names = [q["name"] for q in numbers["query_sets"]]
    assert names == ["text:captions", "audio:query_log", "depth:file:depth.npy"]
    assert numbers["blend"]["k"] == 8
    html = (out / "gap.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for name in ("top1", "projection", "paired"):
        assert (out / f"gap_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_refuses_a_table_with_no_query_set(tmp_path, capsys):
    from tables import make_images_table

    store = make_images_table(tmp_path / "db", n=20, dim=16)
    argv = ["report", "gap", "--table-uri", store.uri, "--index-dir", str(tmp_path / "ix")]
    assert main(argv) == 2
    assert "no query set" in capsys.readouterr().err
