"""Any JSON a client sends gets an answer that is not a server error: seeded mutations of valid
request bodies (a field's value swapped for a hostile one: a huge or fractional number, a lone
surrogate, a wrong type, deep nesting, a bad filter) are 200 or a 4xx in the one error shape,
never a 5xx or a dropped connection, and the service is ready afterwards.

The three 500s this once found (a 5,000-digit integer, a lone surrogate, a fraction compared
with a 63-bit id) have their own tests in test_serve_hardening.py; this keeps the next one out.
Bounded: a fixed seed and ``ROUNDS`` requests.
"""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.served(rows=120, llm=True, max_k=50)

ROUNDS = 600
SEED = 20261203

VALID: dict[str, dict[str, Any]] = {
    "/v1/embed": {"inputs": [{"modality": "text", "text": "a red dog", "weight": 1.0}]},
    "/v1/search": {
        "inputs": [{"modality": "text", "text": "a red dog"}],
        "k": 5,
        "offset": 0,
        "filter": "width > 0",
        "dedup": 0.9,
    },
    "/v1/enhance": {
        "inputs": [{"modality": "text", "text": "a red dog"}],
        "k": 4,
        "t": 20.0,
        "alpha": 0.5,
    },
    "/v1/generate": {
        "prompt": "Describe it.",
        "inputs": [{"modality": "text", "text": "a red dog"}],
        "max_new_tokens": 2,
        "temperature": 0.0,
        "stream": False,
    },
    "/v1/classify": {
        "inputs": [{"modality": "text", "text": "a red dog"}],
        "labels": ["dog", "cat"],
        "templates": ["a photo of a {}."],
        "top_k": 2,
    },
    "/v1/export": {"ids": ["1", 2], "format": "csv"},
}

# Raw JSON text, spliced in where a value was: some of these Python's json module cannot
# produce (NaN, a lone surrogate escape, a 5,000-digit integer).
HOSTILE_VALUES = [
    "1" + "0" * 5000,
    "-1",
    "0",
    "1.5",
    "1e999",
    "-1e-999",
    "NaN",
    "Infinity",
    "9223372036854775808",
    "true",
    "null",
    '""',
    '"a\\ud800b"',
    '"\\u0000"',
    '"' + "x" * 30_000 + '"',
    "[]",
    "{}",
    "[" * 3000 + "]" * 3000,
    '{"a": ' * 300 + "1" + "}" * 300,
    '"id = 1.5"',
    "\"caption LIKE '%' OR id > 99999999999999999999\"",
    '"' + "(" * 40 + "id = 1" + ")" * 40 + '"',
    '"\\ud83d\\ude00"',
    "[1, 2, 3]",
    '{"modality": "smell", "text": "x"}',
    '{"modality": "image", "data": "!!!"}',
    '{"embedding": [NaN, 1]}',
    '{"embedding": []}',
]


def mutate(body: dict[str, Any], rng: random.Random) -> str:
    """``body`` as JSON text with one value (top level or inside the first input) replaced."""
    body = json.loads(json.dumps(body))
    marker = "\u2603MUTANT\u2603"
    target: dict[str, Any] = body
    if "inputs" in body and rng.random() < 0.5:
        target = body["inputs"][0]
    key = rng.choice([*target, "unexpected_field"])
    target[key] = marker
    return json.dumps(body).replace(json.dumps(marker), rng.choice(HOSTILE_VALUES))


@pytest.fixture(scope="module")
def http(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=60) as client:
        yield client


def _error_shape(r: httpx.Response) -> bool:
    try:
        return isinstance(r.json().get("error"), str)
    except ValueError:
        return False


def test_the_valid_bodies_are_valid(http) -> None:
    for route, body in VALID.items():
        assert http.post(route, json=body).status_code == 200, route


def test_mutated_bodies_are_answered_without_a_server_error(http) -> None:
    rng = random.Random(SEED)
    wrong: list[tuple[str, str, int, str]] = []
    statuses: dict[int, int] = {}
    for _ in range(ROUNDS):
        route = rng.choice(list(VALID))
        text = mutate(VALID[route], rng)
        try:
            r = http.post(route, content=text, headers={"Content-Type": "application/json"})
        except httpx.TransportError as exc:  # the server dropped the connection
            wrong.append((route, text[:200], 0, repr(exc)))
            continue
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        in_shape = r.status_code == 200 or (400 <= r.status_code < 500 and _error_shape(r))
        if not in_shape:
            wrong.append((route, text[:200], r.status_code, r.text[:200]))
    assert not wrong, wrong
    assert statuses.get(422, 0) > ROUNDS // 4  # the mutations really were refused, mostly
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"]
