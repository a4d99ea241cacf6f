"""The OpenAI-compatible routes' overhead against the native ones: the same request, sent
alternately to both, in the same run on the same server (CPU, tiny encoder and tiny LLaMA).

    .venv/bin/python benchmarks/bench_openai.py --n 30

Pairs: ``/v1/embed`` vs ``/v1/embeddings`` (one text), ``/v1/generate`` vs
``/v1/chat/completions`` (one image, seeded, a few tokens; whole answer, and streamed to the
end). Prints one JSON object of median and p90 client latencies in ms per route.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# The demo-cache and media builders are test code, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timed(send: Any) -> float:
    start = time.perf_counter()
    send()
    return (time.perf_counter() - start) * 1000


def stream_to_end(client: httpx.Client, path: str, body: dict[str, Any]) -> None:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        for _ in r.iter_lines():
            pass


def pairs(image: str, tokens: int) -> dict[str, tuple[Any, Any]]:
    """name -> (native request, OpenAI request): each a function of a client."""
    text = {"inputs": [{"modality": "text", "text": "a dog on the grass"}]}
    oa_text = {"model": "imagebind", "input": "a dog on the grass", "encoding_format": "float"}
    sampling = {"temperature": 0.8, "seed": 7}
    native_gen = {
        "prompt": "What is in the image?",
        "inputs": [{"modality": "image", "data": image}],
        "max_new_tokens": tokens,
        **sampling,
    }
    oa_chat = {
        "model": "imagebind-llm",
        "max_tokens": tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                    {"type": "text", "text": "What is in the image?"},
                ],
            }
        ],
        **sampling,
    }

    def post(path: str, body: dict[str, Any]) -> Any:
        def send(c: httpx.Client) -> None:
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text

        return send

    return {
        "embed_text": (post("/v1/embed", text), post("/v1/embeddings", oa_text)),
        "generate_whole": (
            post("/v1/generate", native_gen | {"stream": False}),
            post("/v1/chat/completions", oa_chat),
        ),
        "generate_stream": (
            lambda c: stream_to_end(c, "/v1/generate", native_gen | {"stream": True}),
            lambda c: stream_to_end(c, "/v1/chat/completions", oa_chat | {"stream": True}),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30, help="requests per route (alternating)")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()

    from builders import TableFlatLoader, build_demo_cache, service_settings, tiny_runtime
    from fixtures_media import image_bytes

    from cachebind.inject.tiny import build_tiny_llm
    from cachebind.serve import start_server

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = build_demo_cache(root, rows=args.rows, dim=64)
        svc = service_settings(root, cache, index_poll_s=0)
        runtime = tiny_runtime(
            svc.settings, TableFlatLoader(cache.store), build_tiny_llm(root / "llm", visual_dim=64)
        )
        server = start_server(svc.settings, runtime, port=0)
        image = base64.b64encode(image_bytes(seed=3)).decode()
        headers = {"Authorization": f"Bearer {svc.user_key}"}
        results: dict[str, Any] = {}
        try:
            with httpx.Client(base_url=server.url, headers=headers, timeout=120) as client:
                for name, (native, openai) in pairs(image, args.tokens).items():
                    native(client), openai(client)  # warm both paths
                    times: dict[str, list[float]] = {"native": [], "openai": []}
                    for _ in range(args.n):  # alternate, so drift in load hits both alike
                        times["native"].append(timed(lambda n=native: n(client)))
                        times["openai"].append(timed(lambda o=openai: o(client)))
                    results[name] = {
                        route: {
                            "p50_ms": round(float(np.median(v)), 2),
                            "p90_ms": round(float(np.percentile(v, 90)), 2),
                        }
                        for route, v in times.items()
                    }
                    results[name]["overhead_p50_ms"] = round(
                        results[name]["openai"]["p50_ms"] - results[name]["native"]["p50_ms"], 2
                    )
        finally:
            server.stop()
    print(
        json.dumps(
            {
                "n": args.n,
                "tokens": args.tokens,
                "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(),
                "python": platform.python_version(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
