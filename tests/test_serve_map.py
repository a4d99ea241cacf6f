"""``GET /v1/map`` on a live server: the map of the served table version, coloured by label."""

from __future__ import annotations

import httpx
import pytest

from cachebind.analysis.layout import compute_map
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
