"""Specification of /v1/generate as a batched workload through a real HTTP server: concurrent
requests get what each gets alone, a full queue answers 429 with Retry-After, a client that
leaves frees its decoder slot (seen on /metrics)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.served(rows=120, llm=True)


@pytest.fixture(scope="module")
def http(served):
    svc, server = served.svc, served.server
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {svc.user_key}"}, timeout=60
    ) as client:
        yield client


def metric(http: httpx.Client, name: str, labels: str = "") -> float:
    text = http.get("/metrics").text
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(condition, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_concurrent_generations_each_get_what_they_get_alone(http):
    bodies = [
        {"prompt": p, "stream": False, "max_new_tokens": n, "temperature": 0.7, "seed": s}
        for p, n, s in [("Describe it.", 10, 1), ("What is this?", 20, 2), ("Hello", 15, 3)]
    ]
    alone = [http.post("/v1/generate", json=b).json()["text"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(
            pool.map(lambda b: http.post("/v1/generate", json=b).json()["text"], bodies)
        )
    assert together == alone


def test_a_full_queue_answers_429_with_retry_after(http, served):
    sched = served.runtime.scheduler
    hogs = [
        sched.submit("Describe the image.", max_new_tokens=400, ignore_eos=True)
        for _ in range(sched.max_batch)
    ]
    old_queue, sched.max_queue = sched.max_queue, 0
    try:
        wait_until(lambda: sched.running == sched.max_batch)
        r = http.post("/v1/generate", json={"prompt": "Hi", "stream": False})
        assert r.status_code == 429 and r.json()["error"] == "busy"
        assert int(r.headers["Retry-After"]) >= 1
        wait_until(lambda: metric(http, "cachebind_generate_batch_occupancy") == sched.max_batch)
    finally:
        sched.max_queue = old_queue
        for h in hogs:
            h.cancel()
    wait_until(lambda: sched.running == 0)


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_a_client_that_leaves_frees_its_slot(http, served, stream):
    sched = served.runtime.scheduler
    wait_until(lambda: sched.running == 0)
    label = '{reason="cancelled"}'
    cancelled = metric(http, "cachebind_generate_finished_total", label)
    body = {"prompt": "Describe the image.", "max_new_tokens": 400, "stream": stream}
    # Greedy: deterministic, and this prompt keeps the tiny model in a loop without EOS.
    body["temperature"] = 0.0
    timeout = httpx.Timeout(10, read=10 if stream else 0.3)
    with httpx.Client(base_url=served.server.url, headers=http.headers, timeout=timeout) as client:
        if stream:
            with client.stream("POST", "/v1/generate", json=body) as r:
                lines = r.iter_lines()
                while not next(lines).startswith('data: {"text"'):
                    pass  # leave after the first piece
        else:  # gives up while the server is still generating
            with pytest.raises(httpx.TimeoutException):
                client.post("/v1/generate", json=body)
    wait_until(
        lambda: metric(http, "cachebind_generate_finished_total", label) > cancelled,
        timeout_s=30,
    )
    wait_until(lambda: metric(http, "cachebind_generate_batch_occupancy") == 0)


def test_cached_image_rows_are_refused_by_the_adapter_mode_naming_llava(http):
    body = {"prompt": "Describe it.", "stream": False, "image_ids": [1]}
    r = http.post("/v1/generate", json=body)
    assert r.status_code == 422 and r.json()["error"] == "unsupported_input"
    assert "llava mode" in r.json()["detail"]
    url = {"url": "cachebind://rows/1"}
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": url}],
        }
    ]
    chat = http.post("/v1/chat/completions", json={"model": "imagebind-llm", "messages": messages})
    assert chat.status_code == 400 and "llava mode" in chat.json()["error"]["message"]
