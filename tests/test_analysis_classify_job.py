"""Specification of `cachebind classify`: the command line and the Ray job over fragments."""

from __future__ import annotations

import json

import lancedb
import numpy as np
import pytest
from analysis_tables import analysis_settings, planted_vectors, tiny_encoder
from ray_local import use_local_ray
from tables import image_rows

from cachebind.analysis.classify import class_embeddings, top_labels
from cachebind.analysis.labelling import open_side_table
from cachebind.analysis.zero_shot import classify_table, text_embedder
from cachebind.cli import main
from cachebind.config import StoreConfig

LABELS = ["red circle", "blue square", "green triangle"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture
def fragmented(tmp_path):
    """A planted table written in four appends (four fragments), and its truth."""
    encoder = tiny_encoder(tmp_path / "weights")
    classes = class_embeddings(text_embedder(encoder), LABELS, TEMPLATES)
    vectors, codes = planted_vectors(classes, n=240, noise_fraction=0.3, seed=3)
    db = lancedb.connect(str(tmp_path / "db"))
    table = None
    for start in range(0, 240, 60):
        rows = image_rows(vectors[start : start + 60], start=start, dtype="float32")
        if table is None:
            table = db.create_table("images", rows)
        else:
            table.add(rows)
    store = StoreConfig(uri=str(tmp_path / "db"), table="images", vector_dtype="float32")
    settings = analysis_settings(store, tmp_path / "weights", batch_rows=32)
    return settings, encoder, vectors, classes


@pytest.fixture(scope="module")
def ray_session():

    use_local_ray(num_cpus=2)


def test_the_ray_job_finishes_a_partial_run_with_each_row_once(fragmented, ray_session):
    from jobs.classify import run_classify

    settings, encoder, vectors, classes = fragmented
    first = classify_table(
        settings, LABELS, templates=TEMPLATES, top_k=2, encoder=encoder, limit=70
    )
    assert first.total == 70
    result = run_classify(settings, LABELS, templates=TEMPLATES, top_k=2, encoder=encoder)
    assert result.labelled == 170 and result.total == 240
    side = open_side_table(settings.store, result.name).to_lance().to_table().to_pandas()
    assert side["id"].is_unique and len(side) == 240
    idx, _ = top_labels(vectors, classes, 1)
    ids = np.concatenate(
        [image_rows(vectors[s : s + 60], start=s)["id"].to_numpy() for s in range(0, 240, 60)]
    )
    want = dict(zip(ids.tolist(), np.asarray(LABELS)[idx[:, 0]], strict=True))
    assert all(want[i] == label for i, label in zip(side["id"], side["label"], strict=True))
    again = run_classify(settings, LABELS, templates=TEMPLATES, top_k=2, encoder=encoder)
    assert again.labelled == 0 and again.total == 240


def test_the_command_labels_the_table_and_prints_its_accuracy(tmp_path, monkeypatch, capsys):
    from analysis_tables import labelled_table

    monkeypatch.setenv("CACHEBIND_HOME", str(tmp_path / "home"))
    encoder = tiny_encoder(tmp_path / "home" / "weights")
    classes = class_embeddings(text_embedder(encoder), LABELS, TEMPLATES)
    vectors, codes = planted_vectors(classes, n=90, noise_fraction=0.3, seed=4)
    store = labelled_table(tmp_path / "db", vectors, [LABELS[c] for c in codes])
    (tmp_path / "labels.txt").write_text("# shapes\n" + "\n".join(LABELS) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    argv = [
        "classify",
        "--table-uri",
        store.uri,
        "--preset",
        "tiny",
        "--labels",
        str(tmp_path / "labels.txt"),
        "--templates",
        str(tmp_path / "templates.txt"),
        "--truth",
        "truth",
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["labelled"] == 90 and out["evaluation"]["rows"] == 90
    assert out["evaluation"]["accuracy"] >= 0.95
    assert sum(map(sum, out["evaluation"]["confusion"]["counts"])) == 90


def test_the_command_names_a_bad_labels_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CACHEBIND_HOME", str(tmp_path / "home"))
    (tmp_path / "labels.txt").write_bytes(b"dog\n\xff\xfecat\n")
    labels = str(tmp_path / "labels.txt")
    code = main(["classify", "--table-uri", str(tmp_path), "--labels", labels])
    assert code == 2
    assert "not UTF-8" in capsys.readouterr().err
