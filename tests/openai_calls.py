"""What the OpenAI-compatible clients' tests share: the served model ids, one seeded sampling,
media as data URLs, and the native ``/v1/generate`` call their answers are held against."""

from __future__ import annotations

import base64

import httpx

LLM = "imagebind-llm"
ENCODER = "imagebind"
SAMPLING = {"max_tokens": 12, "temperature": 0.8, "seed": 7}


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def native_generate(http: httpx.Client, prompt: str, inputs: list[dict] | None = None) -> dict:
    """``/v1/generate`` of ``prompt`` and ``inputs`` with ``SAMPLING``."""
    body = {
        "prompt": prompt,
        "inputs": inputs or [],
        "stream": False,
        "max_new_tokens": SAMPLING["max_tokens"],
        "temperature": SAMPLING["temperature"],
        "seed": SAMPLING["seed"],
    }
    r = http.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def native_embeddings(http: httpx.Client, texts: list[str]) -> list[list[float]]:
    """``/v1/embed``'s F_M of each text."""
    r = http.post("/v1/embed", json={"inputs": [{"modality": "text", "text": t} for t in texts]})
    assert r.status_code == 200, r.text
    return [item["embedding"] for item in r.json()["items"]]
