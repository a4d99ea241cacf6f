"""``POST /v1/classify`` and the zero-shot label filter of ``/v1/search``, on a live server."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from fixtures_media import audio_bytes, image_bytes

from cachebind.analysis.labelling import open_side_table
from cachebind.analysis.zero_shot import classify_table

pytestmark = pytest.mark.served(rows=120)

LABELS = ["dog", "cat", "boat"]
TEMPLATES = ["a photo of a {}.", "a sketch of the {}."]


@pytest.fixture(scope="module")
def http(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as client:
        yield client


def embed(http: httpx.Client, inputs: list[dict]) -> np.ndarray:
    r = http.post("/v1/embed", json={"inputs": inputs})
    assert r.status_code == 200, r.text
    return np.array([item["embedding"] for item in r.json()["items"]], dtype=np.float64)


def numpy_classes(http: httpx.Client) -> np.ndarray:
    """Class embeddings computed here from the service's own text embeddings."""
    prompts = [t.replace("{}", label) for label in LABELS for t in TEMPLATES]
    emb = embed(http, [{"modality": "text", "text": p} for p in prompts])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    means = emb.reshape(len(LABELS), len(TEMPLATES), -1).mean(axis=1)
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def test_inputs_of_any_modality_get_the_labels_a_numpy_computation_gives(http):
    inputs = [
        {"modality": "text", "text": "a sketch of the boat."},
        {"modality": "image", "data": base64.b64encode(image_bytes(size=(96, 80))).decode()},
        {"modality": "audio", "data": base64.b64encode(audio_bytes(duration_s=1.0)).decode()},
    ]
    r = http.post(
        "/v1/classify",
        json={"inputs": inputs, "labels": LABELS, "templates": TEMPLATES, "top_k": 3},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["templates"] == 2 and [i["modality"] for i in body["items"]] == [
        "text",
        "image",
        "audio",
    ]
    cos = embed(http, inputs) @ numpy_classes(http).T
    for item, row in zip(body["items"], cos, strict=True):
        order = np.argsort(-row)
        assert [x["label"] for x in item["labels"]] == [LABELS[j] for j in order]
        np.testing.assert_allclose([x["score"] for x in item["labels"]], row[order], atol=1e-4)


def test_the_default_templates_are_clips_eighty(http):
    r = http.post(
        "/v1/classify", json={"inputs": [{"modality": "text", "text": "x"}], "labels": LABELS}
    )
    assert r.status_code == 200, r.text
    assert r.json()["templates"] == 80 and len(r.json()["items"][0]["labels"]) == 1


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"labels": ["dog", "dog"]}, "bad_labels"),
        ({"labels": ["dog", "  "]}, "bad_labels"),
        ({"templates": ["a photo"]}, "bad_labels"),
        ({"labels": [f"label {i}" for i in range(60)]}, "too_many_prompts"),
        ({"top_k": 0}, "invalid_request"),
        ({"labels": ["dog"]}, "invalid_request"),
    ],
)
def test_a_bad_label_set_is_a_422_naming_the_problem(http, extra, error):
    body = {"inputs": [{"modality": "text", "text": "a dog"}], "labels": LABELS, **extra}
    r = http.post("/v1/classify", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == error


def test_search_keeps_only_rows_with_the_asked_zero_shot_label(http, served):
    settings = served.svc.settings
    result = classify_table(settings, LABELS, templates=TEMPLATES, encoder=served.runtime.encoder)
    side = open_side_table(settings.store, result.name).to_lance().to_table().to_pandas()
    label = side["label"].value_counts().index[0]
    wanted = set(side.loc[side.label == label, "id"])
    body = {
        "inputs": [{"modality": "text", "text": "a dog"}],
        "k": 50,
        "label_filter": {"table": result.name, "labels": [label]},
    }
    r = http.post("/v1/search", json=body)
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert hits and {int(h["id"]) for h in hits} <= wanted  # ids are strings in JSON
    assert len(hits) == min(50, len(wanted))


@pytest.mark.parametrize(
    ("table", "status", "error"),
    [("images_errors", 422, "bad_label_filter"), ("images_labels_000000000000", 404, "not_found")],
)
def test_a_label_filter_naming_no_label_table_is_refused(http, table, status, error):
    body = {
        "inputs": [{"modality": "text", "text": "a dog"}],
        "label_filter": {"table": table, "labels": ["dog"]},
    }
    r = http.post("/v1/search", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error


@pytest.mark.parametrize(
    ("ids", "status", "error"),
    [
        ([], 422, "invalid_request"),
        ([-1], 422, "invalid_request"),
        (["12x"], 422, "invalid_request"),
        ([str(2**64)], 422, "invalid_request"),
        ([1] * 100_001, 413, "too_many_ids"),
    ],
)
def test_an_export_of_bad_ids_is_refused_naming_the_problem(http, ids, status, error):
    r = http.post("/v1/export", json={"ids": ids})
    assert r.status_code == status, r.text
    assert r.json()["error"] == error


def test_an_export_is_the_rows_in_the_order_asked_as_csv(http, served):
    import csv
    import io

    ids = served.runtime.snapshot.table.ids()[[5, 0, 9]].tolist()
    r = http.post("/v1/export", json={"ids": [str(i) for i in ids] + ["1"], "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(row["id"]) for row in rows] == ids  # an id not in the table is left out
