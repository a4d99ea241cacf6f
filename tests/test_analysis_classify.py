"""Specification of zero-shot labels over the cache (``cachebind.analysis``).

The planted tables put every image row near the encoder's own class embedding of its label
(noise of norm 0.3 x the smallest distance between two classes), so the labels' meaning is
testable with random weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from analysis_tables import analysis_settings, labelled_table, planted_vectors, tiny_encoder

from cachebind.analysis.classify import class_embeddings, top_labels
from cachebind.analysis.labelling import ids_with_labels, open_side_table, side_metadata
from cachebind.analysis.templates import IMAGENET_TEMPLATES, LabelSetError
from cachebind.analysis.zero_shot import classify_table, text_embedder
from cachebind.modalities import Modality
from cachebind.store import CacheTable

LABELS = ["dog", "cat", "boat", "tree", "house"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}."]
NOISE = 0.3


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("weights"))


@pytest.fixture
def planted(tmp_path, encoder):
    classes = class_embeddings(text_embedder(encoder), LABELS, TEMPLATES)
    vectors, codes = planted_vectors(classes, n=400, noise_fraction=NOISE, seed=1)
    truth = [LABELS[c] for c in codes]
    store = labelled_table(tmp_path / "db", vectors, truth)
    return analysis_settings(store, tmp_path / "weights", batch_rows=64), vectors, codes


def test_the_prompt_ensembled_class_embedding_equals_a_numpy_computation(encoder):
    got = class_embeddings(text_embedder(encoder), LABELS, IMAGENET_TEMPLATES, batch=37)
    for i, label in enumerate(LABELS):
        # Independently: one prompt at a time, CLIP's recipe written out in numpy.
        prompts = [t.replace("{}", label) for t in IMAGENET_TEMPLATES]
        each = np.stack([encoder.embed(Modality.TEXT, [p])[0] for p in prompts]).astype(np.float64)
        each /= np.linalg.norm(each, axis=1, keepdims=True)
        mean = each.mean(axis=0)
        np.testing.assert_allclose(got[i], mean / np.linalg.norm(mean), atol=1e-5)
    assert len(IMAGENET_TEMPLATES) == 80


def test_top_labels_are_the_highest_cosines_best_first():
    rng = np.random.default_rng(0)
    classes = rng.standard_normal((7, 16)).astype(np.float32)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    vectors = rng.standard_normal((50, 16)).astype(np.float32) * 3.0  # not unit-norm
    idx, scores = top_labels(vectors, classes, 3)
    cos = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ classes.T
    np.testing.assert_array_equal(idx, np.argsort(-cos, axis=1)[:, :3])
    np.testing.assert_allclose(scores, np.sort(cos, axis=1)[:, ::-1][:, :3], atol=1e-6)


def test_a_planted_table_is_labelled_correctly_far_above_chance(planted, encoder):
    settings, vectors, codes = planted
    result = classify_table(
        settings, LABELS, templates=TEMPLATES, top_k=2, encoder=encoder, truth_column="truth"
    )
    assert result.labelled == result.total == 400
    evaluation = result.evaluation
    assert evaluation is not None and evaluation.rows == 400
    # Chance is 1/5; the noise keeps every row nearer its own class than half the class gap.
    assert evaluation.accuracy >= 0.95
    assert evaluation.confusion.to_numpy().sum() == 400
    assert list(evaluation.confusion.columns) == LABELS
    side = open_side_table(settings.store, result.name).to_lance().to_table().to_pandas()
    assert side["id"].is_unique and len(side) == 400
    pairs = zip(side["top_labels"], side["label"], strict=True)
    assert all(len(top) == 2 and top[0] == label for top, label in pairs)
    meta = side_metadata(open_side_table(settings.store, result.name).schema)
    assert meta["labels"] == LABELS and meta["templates"] == TEMPLATES
    assert meta["encoder"]["weights"] == encoder.identity["weights"] and meta["top_k"] == 2
    assert set(side["table_version"]) == {result.table_version}


def test_accuracy_and_confusion_equal_a_count_of_the_side_table(planted, encoder):
    settings, _, codes = planted
    result = classify_table(
        settings, LABELS, templates=TEMPLATES, encoder=encoder, truth_column="truth"
    )
    side = open_side_table(settings.store, result.name).to_lance().to_table().to_pandas()
    from cachebind.store import CacheTable

    images = CacheTable.open(settings.store).dataset.to_table(columns=["id", "truth"]).to_pandas()
    joined = images.merge(side, on="id")
    assert result.evaluation is not None
    assert result.evaluation.accuracy == pytest.approx((joined.truth == joined.label).mean())
    expected = joined.groupby(["truth", "label"]).size()
    for (truth, label), n in expected.items():
        assert result.evaluation.confusion.loc[truth, label] == n


def test_a_resumed_run_labels_the_rest_and_writes_no_duplicates(planted, encoder):
    settings, vectors, _ = planted
    first = classify_table(settings, LABELS, templates=TEMPLATES, encoder=encoder, limit=150)
    assert first.labelled == first.total == 150
    second = classify_table(settings, LABELS, templates=TEMPLATES, encoder=encoder)
    assert second.labelled == 250 and second.total == 400
    third = classify_table(settings, LABELS, templates=TEMPLATES, encoder=encoder)
    assert third.labelled == 0 and third.total == 400
    side = open_side_table(settings.store, second.name).to_lance().to_table().to_pandas()
    assert side["id"].is_unique and len(side) == 400
    # The resumed labels equal those of one uninterrupted computation.
    classes = class_embeddings(text_embedder(encoder), LABELS, TEMPLATES)
    idx, _ = top_labels(vectors, classes, 1)
    from tables import image_rows

    order = image_rows(vectors, dtype="float32")["id"].to_numpy()
    want = dict(zip(order.tolist(), np.asarray(LABELS)[idx[:, 0]], strict=True))
    assert all(want[i] == lab for i, lab in zip(side["id"], side["label"], strict=True))


def test_a_side_table_refuses_a_run_with_other_templates_unless_replaced(planted, encoder):
    settings, _, _ = planted
    classify_table(settings, LABELS, templates=TEMPLATES, encoder=encoder, limit=10)
    with pytest.raises(LabelSetError, match="templates"):
        classify_table(settings, LABELS, templates=TEMPLATES[:1], encoder=encoder)
    again = classify_table(settings, LABELS, templates=TEMPLATES[:1], encoder=encoder, replace=True)
    assert again.labelled == again.total == 400


@pytest.mark.parametrize(
    ("labels", "templates", "message"),
    [
        ([], None, "empty"),
        (["dog", "dog"], None, "twice"),
        (["dog", " "], None, "empty"),
        (["dog", "cat"], ["a photo of a dog"], "no {}"),
    ],
)
def test_a_bad_label_set_is_refused_naming_the_problem(
    planted, encoder, labels, templates, message
):
    settings, _, _ = planted
    with pytest.raises(LabelSetError, match=message):
        classify_table(settings, labels, templates=templates, encoder=encoder)


def test_label_ids_select_the_rows_whose_best_label_is_asked(planted, encoder):
    settings, _, _ = planted
    result = classify_table(settings, LABELS, templates=TEMPLATES, encoder=encoder)
    side = open_side_table(settings.store, result.name).to_lance().to_table().to_pandas()
    got = ids_with_labels(settings.store, result.name, ["cat", "tree"])
    np.testing.assert_array_equal(got, np.sort(side[side.label.isin(["cat", "tree"])].id))


def test_the_notebook_call_returns_the_labels_as_a_dataframe_and_the_confusion_figure(
    planted, encoder
):
    from matplotlib.figure import Figure

    from cachebind.analysis import notebook

    settings, _, _ = planted
    labelled = notebook.classify(
        settings, LABELS, templates=TEMPLATES, encoder=encoder, truth_column="truth"
    )
    frame = labelled.frame
    assert len(frame) == 400 and frame["id"].is_unique
    assert {"key", "caption", "label", "score", "top_labels"} <= set(frame.columns)
    assert frame["key"].str.startswith("img-").all()
    assert isinstance(labelled.confusion_figure, Figure)
    assert labelled.result.evaluation is not None
    assert labelled.result.evaluation.accuracy == pytest.approx(
        frame.merge(
            CacheTable.open(settings.store).dataset.to_table(columns=["id", "truth"]).to_pandas()
        ).pipe(lambda f: (f.truth == f.label).mean())
    )


@pytest.mark.parametrize("column", ["nope", "vector"])
def test_a_truth_column_that_is_not_a_column_of_values_is_refused(planted, encoder, column):
    settings, _, _ = planted
    with pytest.raises(LabelSetError, match="no ground-truth column"):
        classify_table(settings, LABELS, templates=TEMPLATES, encoder=encoder, truth_column=column)
