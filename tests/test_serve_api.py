"""The HTTP served, against a real uvicorn server on 127.0.0.1 over a real small cache.

The server runs the tiny random-init ImageBind encoder, a LanceDB table of 200 rows with JPEG
thumbnails, an exact FAISS index over it, and a tiny LLaMA with the ImageBind-LLM adapter.
"""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from cachebind.cache import CacheModel
from cachebind.serve.search import _dedup
from cachebind.store import row_id

pytestmark = pytest.mark.served(rows=200, llm=True, max_k=50, max_request_bytes=256 * 1024)


@pytest.fixture(scope="module")
def http(served):
    svc, server = served.svc, served.server
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {svc.user_key}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
def table(served):
    return served.runtime.snapshot.table


def jpeg_b64(colour=(200, 30, 30), size=(96, 80)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def vector_of(table, key: str) -> np.ndarray:
    return table.vectors([row_id(key)])[0]


def error_of(response: httpx.Response) -> str:
    return response.json()["error"]


# --------------------------------------------------------------------------- auth


def test_health_probes_need_no_key_and_everything_else_does(served):
    server = served.server
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert "error" not in ready.json()  # load errors may name server paths: keys only
    for method, path in [
        ("GET", "/metrics"),
        ("GET", "/v1/index"),
        ("POST", "/v1/search"),
        ("GET", "/v1/images/1"),
    ]:
        r = httpx.request(method, f"{server.url}{path}", json={})
        assert r.status_code == 401, path
        assert error_of(r) == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_401_and_user_key_on_admin_route_is_403(served):
    svc, server = served.svc, served.server
    wrong = {"Authorization": "Bearer " + svc.user_key + "x"}
    assert httpx.get(f"{server.url}/v1/index", headers=wrong).status_code == 401
    user = {"X-API-Key": svc.user_key}
    assert httpx.get(f"{server.url}/v1/index", headers=user).status_code == 200
    r = httpx.post(f"{server.url}/v1/admin/reload", headers=user)
    assert r.status_code == 403 and error_of(r) == "forbidden"
    assert httpx.post(f"{server.url}/v1/admin/reload").status_code == 401
    admin = {"Authorization": f"Bearer {svc.admin_key}"}
    r = httpx.post(f"{server.url}/v1/admin/reload", headers=admin)
    assert r.status_code == 200
    assert r.json() == {
        "reloaded": False,
        "version": "flat-v1",
        "detail": "already serving the published version",
        "extra_versions": {},
    }
    # An admin key opens the user routes too.
    assert httpx.get(f"{server.url}/v1/index", headers=admin).status_code == 200


def test_readyz_reports_encoder_and_index(http):
    body = http.get("/readyz").json()
    assert body["ready"] is True
    assert body["index_version"] == "flat-v1"
    assert body["generator"] is True


# --------------------------------------------------------------------------- embed


def test_embed_json_text_and_image_gives_unit_vectors_with_encoder_identity(http, served):
    runtime = served.runtime
    r = http.post(
        "/v1/embed",
        json={
            "inputs": [
                {"modality": "text", "text": "a red dog"},
                {"modality": "image", "data": jpeg_b64()},
            ]
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 64
    assert body["encoder"]["preset"] == "tiny"
    assert [i["modality"] for i in body["items"]] == ["text", "image"]
    text_vec = np.asarray(body["items"][0]["embedding"])
    assert text_vec.shape == (64,)
    assert np.linalg.norm(text_vec) == pytest.approx(1.0, abs=1e-5)
    # The service's F_M is the encoder's own embed() of the same input.
    expected = runtime.encoder.embed("text", ["a red dog"])[0]
    np.testing.assert_allclose(text_vec, expected, atol=1e-5)


def test_embed_multipart_upload(http, served):
    runtime = served.runtime
    raw = base64.b64decode(jpeg_b64((10, 200, 10)))
    r = http.post(
        "/v1/embed",
        data={"modality": "image", "text": ["a green tree"]},
        files=[("file", ("q.jpg", raw, "image/jpeg"))],
    )
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [i["modality"] for i in items] == ["text", "image"]
    np.testing.assert_allclose(
        items[1]["embedding"], runtime.encoder.embed("image", [raw])[0], atol=1e-5
    )


# --------------------------------------------------------------------------- search


def test_search_by_raw_embedding_finds_the_row_itself_first(http, table):
    r = http.post(
        "/v1/search", json={"inputs": [{"embedding": vector_of(table, "sample-000042").tolist()}]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    top = body["results"][0]
    assert top["key"] == "sample-000042"
    assert top["caption"] == "a blue dog"
    assert top["score"] == pytest.approx(1.0, abs=2e-3)
    assert top["image_url"] == f"/v1/images/{row_id('sample-000042')}"
    assert len(body["results"]) == 10
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["index_version"] == "flat-v1"


def test_search_by_text_returns_the_exact_neighbours_of_its_embedding(http, table, served):
    runtime = served.runtime
    r = http.post("/v1/search", json={"inputs": [{"modality": "text", "text": "a dog"}], "k": 5})
    assert r.status_code == 200, r.text
    f_m = runtime.encoder.embed("text", ["a dog"])
    _, ids = runtime.snapshot.index.search(f_m, 5)
    assert [h["id"] for h in r.json()["results"]] == [str(i) for i in ids[0].tolist()]


def test_weighted_mix_is_the_normalised_weighted_sum(http, table):
    a, b = vector_of(table, "sample-000001"), vector_of(table, "sample-000002")
    mix = [
        {"embedding": a.tolist(), "weight": 3.0},
        {"embedding": b.tolist(), "weight": 1.0},
    ]
    hits = http.post("/v1/search", json={"inputs": mix, "k": 2}).json()["results"]
    # F_M = 0.75 a + 0.25 b: a ranks first; its score is F_M . a.
    assert hits[0]["key"] == "sample-000001"
    expected = float((0.75 * a + 0.25 * b) @ a / np.linalg.norm(a) ** 2)
    assert hits[0]["score"] == pytest.approx(expected, abs=5e-3)


def test_filter_is_applied_and_widens_until_k_results(http, table):
    query = vector_of(table, "sample-000003").tolist()
    flt = "width > 100 AND caption LIKE '%dog%'"
    body = http.post("/v1/search", json={"inputs": [{"embedding": query}], "k": 20, "filter": flt})
    assert body.status_code == 200, body.text
    hits = body.json()["results"]
    # Brute force over the whole table: which rows pass, ranked by score.
    everything = table.dataset.to_table(columns=["id", "caption", "width"])
    passing = everything.filter(
        (pc.field("width") > 100) & pc.match_like(pc.field("caption"), "%dog%")
    )
    assert passing.num_rows >= 20  # the fixture has 25 dogs, most wider than 100
    vectors = table.vectors(passing.column("id").to_pylist())
    order = np.argsort(-(vectors @ np.asarray(query)), kind="stable")
    expected = [passing.column("id")[int(i)].as_py() for i in order[:20]]
    assert [int(h["id"]) for h in hits] == expected
    assert all(h["width"] > 100 and "dog" in h["caption"] for h in hits)


def test_filter_matching_few_rows_returns_them_all_and_says_exhausted(http, table):
    query = vector_of(table, "sample-000003").tolist()
    flt = "key IN ('sample-000007', 'sample-000150', 'nope') OR id = 5"
    body = http.post(
        "/v1/search", json={"inputs": [{"embedding": query}], "k": 10, "filter": flt}
    ).json()
    assert sorted(h["key"] for h in body["results"]) == ["sample-000007", "sample-000150"]
    assert body["exhausted"] is True and body["next_cursor"] is None


def test_dedup_drops_results_too_close_to_a_kept_one(http, table):
    query = vector_of(table, "sample-000010")
    plain = http.post("/v1/search", json={"inputs": [{"embedding": query.tolist()}], "k": 10})
    dedup = http.post(
        "/v1/search", json={"inputs": [{"embedding": query.tolist()}], "k": 10, "dedup": 0.15}
    )
    plain_ids = [h["id"] for h in plain.json()["results"]]
    kept = [h["id"] for h in dedup.json()["results"]]
    assert len(kept) == 10 and kept != plain_ids
    v = table.vectors(kept)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cos = v @ v.T
    assert np.max(cos[~np.eye(len(kept), dtype=bool)]) <= 0.15
    assert kept[0] == plain_ids[0]


def test_dedup_is_greedy_in_rank_order():
    v = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.1, 0.99]], dtype=np.float32)
    assert _dedup(v, 0.9, need=10) == [0, 2]


def test_pagination_by_offset_and_cursor_tiles_the_ranking(http, table):
    query = {"inputs": [{"embedding": vector_of(table, "sample-000020").tolist()}]}
    full = [h["id"] for h in http.post("/v1/search", json={**query, "k": 30}).json()["results"]]
    page1 = http.post("/v1/search", json={**query, "k": 10}).json()
    page2 = http.post("/v1/search", json={**query, "k": 10, "cursor": page1["next_cursor"]}).json()
    page3 = http.post("/v1/search", json={**query, "k": 10, "offset": 20}).json()
    assert page1["next_offset"] == 10 and page2["offset"] == 10
    pages = [h["id"] for p in (page1, page2, page3) for h in p["results"]]
    assert pages == full


def test_images_are_served_from_the_table_and_404_when_absent(http, table):
    r = http.get(f"/v1/images/{row_id('sample-000001')}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    # The fixture leaves every tenth row without a thumbnail.
    r = http.get(f"/v1/images/{row_id('sample-000009')}")
    assert r.status_code == 404 and error_of(r) == "not_found"
    assert http.get("/v1/images/12345").status_code == 404
    assert http.get("/v1/images/not-a-number").status_code == 422
    assert http.get(f"/v1/images/{2**64}").status_code == 422
    assert http.get("/v1/images/-1").status_code == 422


# --------------------------------------------------------------------------- enhance


def test_enhance_matches_the_cache_model_in_process(http, served):
    runtime = served.runtime
    r = http.post(
        "/v1/enhance",
        json={
            "inputs": [{"modality": "text", "text": "a blue boat"}],
            "k": 5,
            "t": 10,
            "alpha": 0.3,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    f_m = runtime.encoder.embed("text", ["a blue boat"])
    expected = CacheModel(runtime.snapshot.index, runtime.snapshot.table).enhance(f_m, 5, 10, 0.3)[
        0
    ]
    np.testing.assert_allclose(body["embedding"], expected.embedding, atol=1e-5)
    assert [n["id"] for n in body["neighbours"]] == [str(i) for i in expected.ids.tolist()]
    weights = [n["weight"] for n in body["neighbours"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert all(n["caption"].startswith("a ") for n in body["neighbours"])
    tilde, q = np.asarray(body["embedding"]), np.asarray(body["query_embedding"])
    assert body["cosine_to_query"] == pytest.approx(float(tilde @ q / np.linalg.norm(q)), abs=1e-5)
    assert (body["k"], body["t"], body["alpha"]) == (5, 10.0, 0.3)


def test_enhance_defaults_come_from_cache_config(http, table):
    r = http.post(
        "/v1/enhance", json={"inputs": [{"embedding": vector_of(table, "sample-000005").tolist()}]}
    )
    body = r.json()
    assert (body["k"], body["t"], body["alpha"]) == (10, 20.0, 0.5)
    assert len(body["neighbours"]) == 10


# --------------------------------------------------------------------------- generate


def test_generate_streams_server_sent_events_then_done(http, served):
    runtime = served.runtime
    body = {
        "prompt": "Describe the picture.",
        "inputs": [{"modality": "image", "data": jpeg_b64()}],
        "max_new_tokens": 12,
        "temperature": 0.0,
    }
    events: list[tuple[str | None, dict]] = []
    with http.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
                event = None
    kinds = [e for e, _ in events]
    assert kinds[0] == "neighbours" and kinds[-1] == "done"
    pieces = [d["text"] for e, d in events if e is None]
    assert len(pieces) >= 1
    assert "".join(pieces) == events[-1][1]["text"]
    # Greedy decoding is deterministic: the non-streamed answer is the same text, and it is
    # what the generator gives in-process for F~_M of the same input.
    same = http.post("/v1/generate", json={**body, "stream": False})
    assert same.status_code == 200 and same.json()["text"] == events[-1][1]["text"]
    enhanced = http.post("/v1/enhance", json={"inputs": body["inputs"]}).json()["embedding"]
    visual = np.asarray([enhanced], dtype=np.float32)
    direct = runtime.generator.generate(["Describe the picture."], visual, 12, 0.0)[0]
    assert direct == events[-1][1]["text"]


def test_generate_without_inputs_is_plain_llama(http):
    r = http.post("/v1/generate", json={"prompt": "Hello", "stream": False, "max_new_tokens": 4})
    assert r.status_code == 200 and r.json()["neighbours"] == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "error", "says"),
    [
        ({"inputs": [{"modality": "image", "data": "***"}]}, "bad_base64", "base64"),
        ({"inputs": [{"modality": "smell", "data": "AAAA"}]}, "invalid_request", "modality"),
        ({"inputs": [{"modality": "image", "data": "AAAAAAAA"}]}, "undecodable", "inputs[0]"),
        ({"inputs": [{"modality": "audio", "data": "AAAAAAAA"}]}, "undecodable", "inputs[0]"),
        ({"inputs": [{"embedding": [0.1, 0.2]}]}, "wrong_dimension", "64"),
        ({"inputs": [{"embedding": [0.0] * 64}]}, "bad_embedding", "non-zero"),
        ({"inputs": []}, "invalid_request", "inputs"),
        ({"inputs": [{"modality": "text", "text": "x", "weight": 0}]}, "invalid_request", "weight"),
        (
            {"inputs": [{"modality": "text", "text": "x", "weight": -1}]},
            "invalid_request",
            "weight",
        ),
        ({"inputs": [{"modality": "text"}]}, "invalid_request", "exactly one"),
        ({"inputs": [{"modality": "text", "text": "x"}], "k": 51}, "k_out_of_range", "50"),
        ({"inputs": [{"modality": "text", "text": "x"}], "k": 0}, "invalid_request", "k"),
        (
            {"inputs": [{"modality": "text", "text": "x"}], "k": 30, "offset": 30},
            "k_out_of_range",
            "offset",
        ),
        (
            {"inputs": [{"modality": "text", "text": "x"}], "filter": "vector > 0"},
            "bad_filter",
            "vector",
        ),
        (
            {"inputs": [{"modality": "text", "text": "x"}], "filter": "width > 'a'"},
            "bad_filter",
            "numeric",
        ),
        (
            {"inputs": [{"modality": "text", "text": "x"}], "filter": "id=1; DROP TABLE images"},
            "bad_filter",
            "unexpected character ';'",
        ),
        (
            {"inputs": [{"modality": "text", "text": "x"}], "filter": "1 = 1"},
            "bad_filter",
            "expected a column name",
        ),
        ({"inputs": [{"modality": "text", "text": "x"}], "cursor": "zz"}, "bad_cursor", "cursor"),
        (
            {"inputs": [{"modality": "text", "text": "x"}], "filtre": "id = 1"},
            "invalid_request",
            "filtre",
        ),
    ],
)
def test_each_malformed_search_gets_a_422_that_says_what_is_wrong(http, body, error, says):
    r = http.post("/v1/search", json=body)
    assert r.status_code == 422, r.text
    assert error_of(r) == error
    assert says in json.dumps(r.json()["detail"]) + r.json().get("source", "")
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    "raw",
    [
        '{"inputs": [{"modality": "text", "text": "x", "weight": Infinity}]}',
        '{"inputs": [{"embedding": [NaN' + ", 0.1" * 63 + "]}]}",
        '{"inputs": [{"modality": "text", "text": "x"}], "dedup": NaN}',
    ],
)
def test_non_finite_numbers_are_refused(http, raw):
    r = http.post("/v1/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and error_of(r) == "invalid_request"
    assert "finite" in r.text


def test_media_are_never_read_from_a_server_path(http):
    r = http.post(
        "/v1/embed", json={"inputs": [{"modality": "image", "data": None, "text": "/etc/passwd"}]}
    )
    assert r.status_code == 422
    # A path sent as the bytes of an image is just undecodable bytes.
    path = base64.b64encode(b"/etc/hostname").decode()
    r = http.post("/v1/embed", json={"inputs": [{"modality": "image", "data": path}]})
    assert r.status_code == 422 and error_of(r) == "undecodable"


def test_not_json_and_too_large_bodies(http):
    r = http.post("/v1/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and error_of(r) == "bad_json"
    r = http.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    not_utf8 = b"\xff\x00{"
    r = http.post("/v1/generate", content=not_utf8, headers={"content-type": "application/json"})
    assert r.status_code == 422 and error_of(r) == "bad_json"
    big = {"inputs": [{"modality": "image", "data": "A" * (300 * 1024)}]}
    r = http.post("/v1/search", json=big)
    assert r.status_code == 413 and error_of(r) == "request_too_large"

    def chunks():  # no content-length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 8192

    r = http.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_metrics_count_requests_by_route_and_status_and_batches(http):
    http.post("/v1/search", json={"inputs": [{"modality": "text", "text": "a cat"}], "k": 3})
    http.post("/v1/search", json={"inputs": []})
    text = http.get("/metrics").text
    assert 'cachebind_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert 'cachebind_requests_total{method="POST",route="/v1/search",status="422"}' in text
    assert 'cachebind_request_latency_seconds_bucket{le="0.1",route="/v1/search"}' in text
    assert 'cachebind_batch_size_count{batcher="encoder:text"}' in text
    assert 'cachebind_index_info{version="flat-v1"} 1.0' in text


def test_openapi_describes_the_v1_routes(served):
    spec = httpx.get(f"{served.url}/openapi.json").json()
    for path in ["/v1/embed", "/v1/search", "/v1/enhance", "/v1/generate", "/v1/index"]:
        assert path in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert "SearchRequest" in spec["components"]["schemas"]


def test_openapi_refs_resolve_and_every_keyed_route_documents_the_error_body(served):
    spec = httpx.get(f"{served.url}/openapi.json").json()
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if path in ("/healthz", "/readyz"):
                continue  # open to probes: no key, no error body
            for status in ("401", "413", "422", "500"):
                body = op["responses"][status]["content"]["application/json"]["schema"]
                assert body == error_ref, (method, path, status)
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_errors_raised_by_the_framework_have_the_same_shape(served, http):
    r = httpx.get(f"{served.url}/v1/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "Not Found"}
    r = http.delete("/v1/search")
    assert r.status_code == 405 and error_of(r) == "method_not_allowed"


def test_booleans_must_be_booleans(http):
    r = http.post("/v1/generate", json={"prompt": "hi", "inputs": [], "stream": 0})
    assert r.status_code == 422 and "stream" in json.dumps(r.json()["detail"])
