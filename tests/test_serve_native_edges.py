"""Specification of the native API's edges a client meets first: media as data URLs, a
generation that says why it ended and how many tokens it took, a stream OpenAPI describes."""

from __future__ import annotations

import base64
import json
import urllib.parse

import httpx
import numpy as np
import pytest
from fixtures_media import image_bytes

from cachebind.inject.prompts import format_prompt

pytestmark = pytest.mark.served(rows=60, llm=True)

IMAGE = image_bytes(seed=5)
B64 = base64.b64encode(IMAGE).decode()


@pytest.fixture(scope="module")
def http(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as client:
        yield client


def embedding(http: httpx.Client, data: str) -> np.ndarray:
    r = http.post("/v1/embed", json={"inputs": [{"modality": "image", "data": data}]})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["items"][0]["embedding"])


def test_a_data_url_is_taken_wherever_base64_media_is(http):
    plain = embedding(http, B64)
    assert np.allclose(embedding(http, f"data:image/png;base64,{B64}"), plain, atol=1e-6)
    percent = "data:image/png," + urllib.parse.quote_from_bytes(IMAGE)
    assert np.allclose(embedding(http, percent), plain, atol=1e-6)
    r = http.post(
        "/v1/search",
        json={"inputs": [{"modality": "image", "data": f"data:image/png;base64,{B64}"}], "k": 3},
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_a_data_url_without_its_comma_is_a_422_naming_the_field(http):
    r = http.post("/v1/embed", json={"inputs": [{"modality": "image", "data": "data:image/png"}]})
    assert r.status_code == 422
    assert r.json()["error"] == "bad_data_url" and "inputs[0].data" in r.json()["detail"]


def generation(http: httpx.Client, stream: bool) -> tuple[dict, dict | None]:
    body = {
        "prompt": "Describe it.",
        "inputs": [{"modality": "image", "data": B64}],
        "max_new_tokens": 10,
        "temperature": 0.8,
        "seed": 11,
        "stream": stream,
    }
    if not stream:
        r = http.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json(), None
    events: list[tuple[str | None, dict]] = []
    with http.stream("POST", "/v1/generate", json=body) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
                event = None
    assert events[-1][0] == "done"
    return events[-1][1], events[0][1]


def test_a_generation_ends_with_its_finish_reason_and_token_counts(http, served):
    whole, _ = generation(http, stream=False)
    done, neighbours = generation(http, stream=True)
    assert done == {k: whole[k] for k in ("text", "finish_reason", "usage")}
    assert neighbours["neighbours"] == whole["neighbours"]
    tokenizer = served.runtime.scheduler.tokenizer
    usage = whole["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode(format_prompt("Describe it."), bos=True))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 10
    # "length" exactly when the budget was spent; an earlier end is the end of sequence.
    assert (whole["finish_reason"] == "length") == (usage["completion_tokens"] == 10)


def test_openapi_describes_the_generation_stream_and_its_last_event(http):
    doc = http.get("/openapi.json").json()
    ok = doc["paths"]["/v1/generate"]["post"]["responses"]["200"]
    assert "event: done" in ok["content"]["text/event-stream"]["schema"]["description"]
    done = doc["components"]["schemas"]["GenerateDoneEvent"]
    assert set(done["required"]) == {"text", "finish_reason", "usage"}
    assert "Usage" in doc["components"]["schemas"]


def test_search_enhance_and_generate_take_a_multipart_upload_like_their_json(http):
    json_search = http.post(
        "/v1/search",
        json={"inputs": [{"modality": "image", "data": B64}, {"modality": "text", "text": "a dog"}],
              "k": 4, "filter": "width > 10"},
    ).json()  # fmt: skip
    form_search = http.post(
        "/v1/search",
        data={"modality": "image", "text": "a dog", "k": "4", "filter": "width > 10"},
        files=[("file", ("q.png", IMAGE, "image/png"))],
    )
    assert form_search.status_code == 200, form_search.text
    # The file comes first in the JSON, the text first in the form: the mix is the same.
    assert [h["id"] for h in form_search.json()["results"]] == [
        h["id"] for h in json_search["results"]
    ]
    enhanced = http.post(
        "/v1/enhance", data={"modality": "image", "k": "3"}, files=[("file", ("q.png", IMAGE))]
    )
    assert enhanced.status_code == 200 and len(enhanced.json()["neighbours"]) == 3
    whole, _ = generation(http, stream=False)
    form = {"modality": "image", "prompt": "Describe it.", "max_new_tokens": "10",
            "temperature": "0.8", "seed": "11", "stream": "false"}  # fmt: skip
    uploaded = http.post("/v1/generate", data=form, files=[("file", ("q.png", IMAGE))])
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["text"] == whole["text"]


def hits(r: httpx.Response) -> list[tuple[int, float]]:
    assert r.status_code == 200, r.text
    return [(int(h["id"]), h["score"]) for h in r.json()["results"]]


def test_multipart_weights_pair_with_the_files_and_texts_in_order_like_json_weights(http):
    texts = ["a dog", "at night"]
    weighted = http.post(
        "/v1/search",
        json={"inputs": [{"modality": "text", "text": texts[0], "weight": 0.2},
                         {"modality": "image", "data": B64, "weight": 3},
                         {"modality": "text", "text": texts[1], "weight": 1.5}],
              "k": 8},
    )  # fmt: skip
    form = http.post(
        "/v1/search",
        data={"modality": "image", "text": texts, "text_weight": ["0.2", "1.5"],
              "file_weight": "3", "k": "8"},
        files=[("file", ("q.png", IMAGE, "image/png"))],
    )  # fmt: skip
    unweighted = http.post(
        "/v1/search",
        data={"modality": "image", "text": texts, "k": "8"},
        files=[("file", ("q.png", IMAGE, "image/png"))],
    )
    expected, got, plain = hits(weighted), hits(form), hits(unweighted)
    assert [i for i, _ in got] == [i for i, _ in expected]
    # Scores are cosines of unit vectors: float32 rounding is the only difference allowed.
    assert np.allclose([s for _, s in got], [s for _, s in expected], rtol=0, atol=1e-5)
    assert not np.allclose([s for _, s in plain], [s for _, s in expected], rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("weights", "named"),
    [
        ({"text_weight": ["1", "2"]}, "2 text_weight fields for 1 text part(s)"),
        ({"file_weight": "heavy"}, "file_weight #1 is 'heavy'"),
        ({"file_weight": "0"}, "a weight is a number > 0"),
        ({"file_weight": "nan"}, "a weight is a number > 0"),
        ({"text_weight": "-1"}, "text_weight #1 is '-1'"),
    ],
)
def test_a_bad_multipart_weight_is_a_422_naming_it(http, weights, named):
    r = http.post(
        "/v1/search",
        data={"modality": "image", "text": "a dog", **weights},
        files=[("file", ("q.png", IMAGE, "image/png"))],
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "bad_form" and named in r.json()["detail"]


def test_a_bad_multipart_form_is_a_422_naming_what_is_wrong(http):
    no_modality = http.post("/v1/search", files=[("file", ("q.png", IMAGE))])
    assert no_modality.status_code == 422 and "modality" in no_modality.json()["detail"]
    broken = http.post(
        "/v1/search",
        content=b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno name\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert broken.status_code == 422 and broken.json()["error"] in ("bad_form", "invalid_request")
