"""``GET /v1/map`` on a live server: the map of the served table version, coloured by label."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from cachebind.analysis.map_run import compute_map
from cachebind.analysis.zero_shot import classify_table

pytestmark = pytest.mark.served(rows=90)


def test_the_map_is_a_404_until_computed_then_every_row_with_its_label(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as http:
        settings = served.svc.settings.model_copy(deep=True)
        settings.analysis.map_method = "pca"
        r = http.get("/v1/map")
        assert r.status_code == 404 and "cachebind map" in r.json()["detail"]
        compute_map(settings)
        labels = classify_table(
            settings,
            ["red", "green", "blue"],
            templates=["a {} thing"],
            encoder=served.runtime.encoder,
        )
        r = http.get("/v1/map", params={"labels": labels.name})
        assert r.status_code == 200, r.text
        body = r.json()
        table = served.runtime.snapshot.table
        assert body["count"] == 90 and body["table_version"] == table.version
        assert sorted(map(int, body["ids"])) == sorted(table.ids().tolist())
        assert len(body["x"]) == len(body["y"]) == len(body["labels"]) == 90
        assert set(body["labels"]) <= {"red", "green", "blue"}
        bad = http.get("/v1/map", params={"labels": "images_errors"})
        assert bad.status_code == 422 and bad.json()["error"] == "bad_labels"


def test_the_map_is_coloured_by_shard_or_by_a_caption_word_and_bad_colourings_are_422(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    settings = served.svc.settings.model_copy(deep=True)
    settings.analysis.map_method = "pca"
    compute_map(settings)
    table = served.runtime.snapshot.table.dataset.to_table(columns=["id", "caption", "shard"])
    rows = table.to_pandas().set_index(table["id"].cast("string").to_pandas())
    caption, shard = rows["caption"].to_dict(), rows["shard"].to_dict()
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as http:
        by_shard = http.get("/v1/map", params={"color": "shard"}).json()
        assert by_shard["color"] == "shard"
        assert by_shard["labels"] == [shard[i] for i in by_shard["ids"]]

        # A whole word of the caption, case-insensitively: the last word of the first caption.
        word = caption[by_shard["ids"][0]].split()[-1]
        by_word = http.get("/v1/map", params={"color": f"word:{word.upper()}"}).json()
        assert by_word["color"] == f"word:{word}"
        want = [word if word in caption[i].split() else f"no {word}" for i in by_word["ids"]]
        assert by_word["labels"] == want
        assert 0 < want.count(word) < len(want)

        for bad in ["word:", "word:two words", "word:a;drop", "shard:x", "size", "label:x"]:
            r = http.get("/v1/map", params={"color": bad})
            assert r.status_code == 422 and r.json()["error"] == "bad_color", bad
        both = http.get("/v1/map", params={"color": "shard", "labels": "images_labels_0"})
        assert both.status_code == 422
        missing = http.get("/v1/map", params={"color": "label:images_labels_0123456789ab"})
        assert missing.status_code == 404 and "cachebind classify" in missing.json()["detail"]


def test_a_query_equal_to_a_rows_vector_is_placed_on_that_rows_position(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    settings = served.svc.settings.model_copy(deep=True)
    settings.analysis.map_method = "pca"
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as http:
        compute_map(settings)
        body = http.get("/v1/map").json()
        where = {i: (x, y) for i, x, y in zip(body["ids"], body["x"], body["y"], strict=True)}
        table = served.runtime.snapshot.table
        ids, vectors = next(table.iter_vectors(1000))
        for i in (0, len(ids) // 2, len(ids) - 1):
            v = vectors[i].astype(np.float64)
            r = http.post("/v1/map/place", json={"inputs": [{"embedding": v.tolist()}]})
            assert r.status_code == 200, r.text
            placed = r.json()
            assert placed["method"] == "pca" and placed["table_version"] == body["table_version"]
            # The service places F_M, the unit-normalised query; the stored row (fp16) is off
            # unit length by | |v| - 1 |, and PCA's orthonormal axes move it by at most that.
            tolerance = abs(np.linalg.norm(v) - 1) + 1e-5
            got = np.array([placed["x"], placed["y"]])
            assert np.linalg.norm(got - np.array(where[str(ids[i])])) <= tolerance

        bad = http.post("/v1/map/place", json={"inputs": [{"embedding": [0.1, 0.2]}]})
        assert bad.status_code == 422 and "64" in bad.text
        empty = http.post("/v1/map/place", json={"inputs": []})
        assert empty.status_code == 422
