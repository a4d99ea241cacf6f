"""Specification of the OpenAI-compatible routes, driven by the real ``openai`` SDK against a
live server on 127.0.0.1: the same encoder, cache blend and generator as the native routes,
OpenAI's objects and errors."""

from __future__ import annotations

import base64
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from builders import TableFlatLoader, build_demo_cache, service_settings, tiny_runtime
from fixtures_media import audio_bytes, image_bytes, video_bytes
from openai_calls import ENCODER, LLM, SAMPLING, data_url, native_generate

from cachebind.inject.prompts import format_prompt
from cachebind.serve import start_server

pytestmark = pytest.mark.served(rows=120, llm=True, max_text_bytes=4096, max_inputs=8)

IMAGE = image_bytes(seed=3)
WAV = audio_bytes("wav", duration_s=1.0)


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(
        base_url=f"{served.url}/v1", api_key=served.svc.user_key, max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture(scope="module")
def http(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as c:
        yield c


def image_message(text: str) -> list[dict]:
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(IMAGE, "image/png")}},
        {"type": "text", "text": text},
    ]
    return [{"role": "user", "content": parts}]


def wait_until(condition, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------- models


def test_models_lists_the_llm_and_the_encoder_with_ids_a_client_passes_back(client, served):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {LLM, ENCODER}
    assert models[ENCODER].model_extra["cachebind"]["dim"] == served.runtime.dim
    assert models[LLM].model_extra["cachebind"]["kind"] == "llm"


# ---------------------------------------------------------------- embeddings


def test_text_embeddings_equal_the_native_embed_route_in_float_and_in_base64(client, http):
    texts = ["a dog on the grass", "a red car"]
    floats = client.embeddings.create(model=ENCODER, input=texts, encoding_format="float")
    raw = client.embeddings.create(model=ENCODER, input=texts, encoding_format="base64")
    native = http.post(
        "/v1/embed", json={"inputs": [{"modality": "text", "text": t} for t in texts]}
    ).json()
    assert [d.index for d in floats.data] == [0, 1]
    for f, b, n in zip(floats.data, raw.data, native["items"], strict=True):
        # Unit vectors, encoded in separate micro-batches: equal to float32 rounding.
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        assert np.allclose(decoded, f.embedding, rtol=0, atol=1e-6)
        assert np.allclose(f.embedding, n["embedding"], rtol=0, atol=1e-6)
        assert abs(np.linalg.norm(decoded) - 1) < 1e-5
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(texts) * 2


def test_the_sdk_default_encoding_decodes_to_the_same_floats(client):
    default = client.embeddings.create(model=ENCODER, input="a dog")
    floats = client.embeddings.create(model=ENCODER, input="a dog", encoding_format="float")
    assert np.allclose(default.data[0].embedding, floats.data[0].embedding, rtol=0, atol=1e-6)


def test_a_chat_style_embedding_of_one_image_is_the_native_image_embedding(client, http):
    r = client.embeddings.create(
        model=ENCODER,
        input=[],  # replaced by messages below (the SDK requires input)
        encoding_format="float",
        extra_body={"input": None, "messages": image_message("")[:1]},
    )
    native = http.post(
        "/v1/embed",
        json={"inputs": [{"modality": "image", "data": base64.b64encode(IMAGE).decode()}]},
    ).json()
    got = np.asarray(r.data[0].embedding)
    assert np.allclose(got, native["items"][0]["embedding"], atol=1e-6)


def test_the_enhanced_extension_returns_the_cache_enhanced_embedding_and_its_neighbours(
    client, http
):
    r = client.embeddings.create(
        model=ENCODER,
        input="a dog",
        encoding_format="float",
        extra_body={"cachebind": {"enhanced": True, "k": 5, "alpha": 0.4}},
    )
    native = http.post(
        "/v1/enhance",
        json={"inputs": [{"modality": "text", "text": "a dog"}], "k": 5, "alpha": 0.4},
    ).json()
    assert np.allclose(r.data[0].embedding, native["embedding"], atol=1e-6)
    info = r.data[0].model_extra["cachebind"]
    assert [n["id"] for n in info["neighbours"]] == [n["id"] for n in native["neighbours"]]
    assert (info["k"], info["alpha"]) == (5, 0.4)


# ---------------------------------------------------------------- chat


def test_a_seeded_chat_gives_the_same_text_twice_and_the_text_of_native_generate(client, http):
    messages = [{"role": "user", "content": "Describe the picture."}]
    first = client.chat.completions.create(model=LLM, messages=messages, **SAMPLING)
    second = client.chat.completions.create(model=LLM, messages=messages, **SAMPLING)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert (
        first.choices[0].message.content == native_generate(http, "Describe the picture.")["text"]
    )
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.model == LLM and first.object == "chat.completion"


def test_usage_counts_the_tokens_the_generator_produced(client, served):
    messages = [{"role": "user", "content": "What is this?"}]
    r = client.chat.completions.create(model=LLM, messages=messages, **SAMPLING)
    handle = served.runtime.submit_generation(
        format_prompt("What is this?"),
        None,
        template=False,
        max_new_tokens=SAMPLING["max_tokens"],
        temperature=SAMPLING["temperature"],
        seed=SAMPLING["seed"],
    )
    text = "".join(handle)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == len(handle.tokens)
    assert r.usage.prompt_tokens == handle.prompt_tokens
    assert r.usage.total_tokens == handle.prompt_tokens + len(handle.tokens)
    expected = "length" if len(handle.tokens) == SAMPLING["max_tokens"] else "stop"
    assert r.choices[0].finish_reason == expected


def test_an_image_data_url_goes_through_the_cache_blend_as_native_generate(client, http):
    r = client.chat.completions.create(
        model=LLM, messages=image_message("What is in the image?"), **SAMPLING
    )
    native = native_generate(
        http,
        "What is in the image?",
        [{"modality": "image", "data": base64.b64encode(IMAGE).decode()}],
    )
    assert r.choices[0].message.content == native["text"]
    info = r.model_extra["cachebind"]
    assert info["blend"] is True
    assert [n["id"] for n in info["neighbours"]] == [n["id"] for n in native["neighbours"]]


def test_turning_the_blend_off_drops_the_neighbours(client):
    with_image = client.chat.completions.create(
        model=LLM, messages=image_message("What is in the image?"), **SAMPLING
    )
    off = client.chat.completions.create(
        model=LLM,
        messages=image_message("What is in the image?"),
        extra_body={"cachebind": {"blend": False}},
        **SAMPLING,
    )
    assert off.model_extra["cachebind"]["neighbours"] == []
    assert off.model_extra["cachebind"]["blend"] is False
    assert with_image.model_extra["cachebind"]["neighbours"]


def test_a_wav_input_audio_part_is_encoded_as_audio(client, http):
    parts = [
        {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"},
        },
        {"type": "text", "text": "What do you hear?"},
    ]
    r = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": parts}], **SAMPLING
    )
    native = native_generate(
        http, "What do you hear?", [{"modality": "audio", "data": base64.b64encode(WAV).decode()}]
    )
    assert r.choices[0].message.content == native["text"]


def test_streamed_chunks_add_up_to_the_whole_answer_then_usage_and_done(client, served):
    messages = image_message("What is in the image?")
    whole = client.chat.completions.create(model=LLM, messages=messages, **SAMPLING)
    stream = client.chat.completions.create(
        model=LLM,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        **SAMPLING,
    )
    chunks = list(stream)  # the SDK stops at data: [DONE]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["cachebind"]["neighbours"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert {c.id for c in chunks} == {chunks[0].id}


def test_system_and_earlier_turns_go_into_the_templates_input(client, http):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Describe it."},
    ]
    r = client.chat.completions.create(model=LLM, messages=messages, **SAMPLING)
    prompt = format_prompt("Describe it.", "Answer briefly.\n\nUser: Hello\nAssistant: Hi.")
    expected = client.completions.create(model=LLM, prompt=prompt, **SAMPLING)
    assert r.choices[0].message.content == expected.choices[0].text


def test_a_stop_string_ends_the_answer_before_it(client):
    messages = [{"role": "user", "content": "Describe the picture."}]
    free = client.chat.completions.create(model=LLM, messages=messages, **SAMPLING)
    text = free.choices[0].message.content
    # Plain letters: a stop string is matched in the text as decoded so far, where a
    # character still missing its next bytes is not yet there.
    found = re.search(r"[A-Za-z]{2}", text[1:])
    assert found, f"the tiny model's answer has no two letters in a row: {text!r}"
    cut = found.group(0)
    stopped = client.chat.completions.create(model=LLM, messages=messages, stop=[cut], **SAMPLING)
    assert stopped.choices[0].message.content == text[: text.find(cut)]
    assert stopped.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- completions


def test_a_templated_completion_is_the_native_generation_of_the_same_prompt(client, http):
    r = client.completions.create(
        model=LLM, prompt="Describe it.", extra_body={"cachebind": {"template": True}}, **SAMPLING
    )
    assert r.choices[0].text == native_generate(http, "Describe it.")["text"]
    assert r.object == "text_completion"
    streamed = client.completions.create(
        model=LLM,
        prompt="Describe it.",
        stream=True,
        extra_body={"cachebind": {"template": True}},
        **SAMPLING,
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


# ---------------------------------------------------------------- errors


def test_a_bad_key_is_the_sdks_authentication_error(served):
    bad = openai.OpenAI(base_url=f"{served.url}/v1", api_key="not-a-key", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401
    assert err.value.body["type"] == "authentication_error"


def test_oversized_input_is_the_sdks_bad_request_error_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=ENCODER, input="x" * 5000)
    assert err.value.code == "text_too_large"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=ENCODER, input=["a"] * 9)
    assert err.value.code == "too_many_inputs"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert err.value.code == "text_too_large"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
    ids=["n", "logprobs", "tools", "presence_penalty"],
)
def test_an_unsupported_option_is_a_bad_request_naming_it(client, options, named):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": "Hi"}], **options
        )
    assert err.value.code == "unsupported_parameter"
    assert err.value.param == named and named in err.value.message


def test_a_remote_media_url_is_refused_unless_its_host_is_allow_listed(client):
    parts = [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "What is it?"},
    ]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": parts}])
    assert err.value.code == "remote_url_refused"
    assert "example.com" in err.value.message and "media_hosts" in err.value.message
    assert err.value.param == "messages[0].content[0].image_url.url"


def test_an_undecodable_image_is_a_bad_request(client):
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(b"not an image", "image/png")}},
        {"type": "text", "text": "What is it?"},
    ]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": parts}])
    assert err.value.body["type"] == "invalid_request_error"


def test_an_unknown_model_is_the_sdks_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.param == "model" and LLM in err.value.message


def test_a_full_queue_is_the_sdks_rate_limit_error_with_retry_after(client, served):
    sched = served.runtime.scheduler
    wait_until(lambda: sched.running == 0)
    hogs = [
        sched.submit("Describe the image.", max_new_tokens=400, ignore_eos=True)
        for _ in range(sched.max_batch)
    ]
    old_queue, sched.max_queue = sched.max_queue, 0
    try:
        wait_until(lambda: sched.running == sched.max_batch)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "Hi"}])
        assert int(err.value.response.headers["Retry-After"]) >= 1
        assert err.value.code == "busy"
    finally:
        sched.max_queue = old_queue
        for h in hogs:
            h.cancel()
    wait_until(lambda: sched.running == 0)


# ---------------------------------------------------------------- remote media


class MediaHost:
    """A real HTTP server on 127.0.0.1 serving one file at /cat.png and redirecting /moved."""

    def __init__(self, body: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", "https://example.com/cat.png")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def allow_localhost(served):
    config = served.svc.settings.serve.openai
    old = config.media_hosts
    config.media_hosts = ["127.0.0.1"]
    yield
    config.media_hosts = old


def test_an_allow_listed_host_is_fetched_like_a_data_url(client, allow_localhost):
    def ask(url: str):
        parts = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is in the image?"},
        ]
        return client.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": parts}], **SAMPLING
        )

    with MediaHost(IMAGE) as host:
        fetched = ask(f"{host}/cat.png")
        with pytest.raises(openai.BadRequestError) as err:
            ask(f"{host}/moved")  # a redirect could leave the allow-list
    assert (
        fetched.choices[0].message.content
        == ask(data_url(IMAGE, "image/png")).choices[0].message.content
    )
    assert err.value.code == "fetch_failed" and "302" in err.value.message


def test_vllms_audio_url_part_takes_a_data_url_like_input_audio(client):
    def ask(part: dict):
        content = [part, {"type": "text", "text": "What do you hear?"}]
        return (
            client.chat.completions.create(
                model=LLM, messages=[{"role": "user", "content": content}], **SAMPLING
            )
            .choices[0]
            .message.content
        )

    inline = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"},
    }
    by_url = {"type": "audio_url", "audio_url": {"url": data_url(WAV, "audio/wav")}}
    assert ask(by_url) == ask(inline)


def test_vllms_video_url_part_is_encoded_as_video_like_native_generate(client, http):
    video = video_bytes()
    parts = [
        {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}},
        {"type": "text", "text": "What happens?"},
    ]
    r = client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": parts}], **SAMPLING
    )
    native = native_generate(
        http, "What happens?", [{"modality": "video", "data": base64.b64encode(video).decode()}]
    )
    assert r.choices[0].message.content == native["text"]
    assert [n["id"] for n in r.model_extra["cachebind"]["neighbours"]] == [
        n["id"] for n in native["neighbours"]
    ]


# ---------------------------------------------------------------- unexpected failures


def test_an_internal_failure_on_an_openai_route_is_the_sdks_internal_server_error(tmp_path, caplog):
    # Its own server: the failure is made by deleting the table under it.
    cache = build_demo_cache(tmp_path, rows=50, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0)
    runtime = tiny_runtime(svc.settings, TableFlatLoader(cache.store))
    enhanced = {"extra_body": {"cachebind": {"enhanced": True, "k": 3}}}
    with (
        start_server(svc.settings, runtime, port=0) as server,
        openai.OpenAI(
            base_url=f"{server.url}/v1", api_key=svc.user_key, max_retries=0, timeout=120
        ) as sdk,
    ):
        assert sdk.embeddings.create(model=ENCODER, input="a dog", **enhanced).data
        # The table's files vanish under the running server (a disk failure, an operator's rm):
        # the neighbours of the enhanced embedding can no longer be read.
        shutil.rmtree(Path(cache.store.uri) / "images.lance")
        with pytest.raises(openai.InternalServerError) as err:
            sdk.embeddings.create(model=ENCODER, input="a dog", **enhanced)
        raw = httpx.post(
            f"{server.url}/v1/embeddings",
            json={"model": ENCODER, "input": "a dog", "cachebind": {"enhanced": True}},
            headers={"Authorization": f"Bearer {svc.user_key}"},
            timeout=120,
        )
        alive = sdk.models.list()
    assert err.value.status_code == 500
    assert err.value.body == {
        "message": "the server failed; see its log",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert raw.status_code == 500 and raw.headers["content-type"] == "application/json"
    assert raw.json() == {"error": err.value.body}
    assert "Traceback" not in raw.text
    assert [m.id for m in alive] == [ENCODER]
    assert any("unhandled error on POST /v1/embeddings" in m for m in caplog.messages)
