"""Specification of the tokens (LLaVA-1.5) mode of the service: a llava-hf checkpoint served
through /v1/generate and the OpenAI chat route, each image's visual tokens placed where
``<image>`` stands, in-flight batched with text rows, and held token for token against
transformers' ``LlavaForConditionalGeneration`` on the same weights and inputs."""

from __future__ import annotations

import base64
import io
import json
import re
import time

import httpx
import jinja2
import jinja2.ext
import openai
import pytest
import torch
from fixtures_media import audio_bytes
from llava_checkpoints import CACHED_IMAGES, RECORDED, write_served_llava
from openai_calls import LLM, data_url
from PIL import Image
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

from cachebind.cli import build_parser, overrides_from
from cachebind.config import Settings
from cachebind.errors import WeightsError
from cachebind.inject.llava_prompt import llava_prompt
from cachebind.inject.llava_serve import PromptImages, load_llava_generator
from cachebind.inject.scheduler import Scheduler
from cachebind.serve.errors import ApiError
from cachebind.serve.llava import check_recorded
from cachebind.serve.openai.render import render_llava_chat
from cachebind.serve.openai.schemas import Message
from cachebind.serve.runtime import Runtime

GREEDY = 10
pytestmark = pytest.mark.served(rows=12, llm="llava", max_inputs=4)

IMAGE, OTHER = CACHED_IMAGES


@pytest.fixture(scope="module")
def http(served):
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(served):
    """transformers' LLaVA and image processor from the directory the server loaded."""
    directory = served.svc.settings.llm.llava_dir
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    return model, CLIPImageProcessor.from_pretrained(directory)


def transformers_greedy(reference, ids: list[int], image: bytes | None) -> list[int]:
    """``LlavaForConditionalGeneration.generate`` (greedy) of ``ids``, its pixels made by
    transformers' own CLIPImageProcessor; the new tokens up to (not with) EOS."""
    model, processor = reference
    images = {}
    if image is not None:
        img = Image.open(io.BytesIO(image)).convert("RGB")
        images["pixel_values"] = processor(images=img, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            **images,
            max_new_tokens=GREEDY,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
        )
    tokens = out[0, len(ids) :].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


def image_input(data: bytes) -> dict:
    return {"modality": "image", "data": base64.b64encode(data).decode()}


def generate(http, prompt: str, images: list[bytes], **extra) -> httpx.Response:
    body = {
        "prompt": prompt,
        "inputs": [image_input(i) for i in images],
        "stream": False,
        "max_new_tokens": GREEDY,
        "temperature": 0.0,
        **extra,
    }
    return http.post("/v1/generate", json=body)


def test_an_image_prompt_gets_the_tokens_transformers_llava_generates_greedily(
    http, served, reference
):
    generator = served.runtime.generator
    prompt = "What is in the picture?"
    ids = generator.prompt_ids(
        prompt, template=True, images=PromptImages.of_pixels(torch.zeros(1, 3, 42, 42))
    )
    expected = transformers_greedy(reference, ids, IMAGE)
    r = generate(http, prompt, [IMAGE])
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["text"] == generator.tokenizer.decode(expected)
    assert answer["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }
    assert answer["neighbours"] == []  # no cache blend in tokens mode
    form = {"prompt": prompt, "stream": "false", "max_new_tokens": str(GREEDY), "temperature": "0"}
    upload = http.post(
        "/v1/generate",
        data={**form, "modality": "image"},
        files=[("file", ("picture.png", IMAGE, "image/png"))],
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["text"] == answer["text"]
    # The prompt is LLaVA-1.5's template with one image token per visual token.
    image_token = generator.llava.image_token_id
    assert ids.count(image_token) == generator.llava.tokens_per_image == 9
    assert llava_prompt(prompt, 1) == f"USER: <image>\n{prompt} ASSISTANT:"


def test_a_text_only_prompt_gets_the_tokens_transformers_generates(http, served, reference):
    generator = served.runtime.generator
    ids = generator.prompt_ids("Describe a red dog.", template=True, images=None)
    expected = transformers_greedy(reference, ids, None)
    r = generate(http, "Describe a red dog.", [])
    assert r.status_code == 200, r.text
    assert r.json()["text"] == generator.tokenizer.decode(expected)
    body = {
        "model": LLM,
        "prompt": "Describe a red dog.",
        "max_tokens": GREEDY,
        "temperature": 0.0,
        "cachebind": {"template": True},  # LLaVA-1.5's template in llava mode
    }
    completion = http.post("/v1/completions", json=body)
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] == r.json()["text"]


def test_rows_batched_together_get_exactly_what_they_get_alone(served):
    """Image and text rows mixed, two joining while the first decodes, prefilled in chunks
    that cut through the image positions: each row's tokens are those of its lone run."""
    generator = served.runtime.generator
    pixels = [
        PromptImages.of_pixels(
            torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(s))
        )
        for s in (1, 2)
    ]
    requests = [
        ("Describe the image.", pixels[0]),
        ("A small cat sitting on a table", None),
        ("What colour is the sky?", pixels[1]),
    ]
    scheduler = Scheduler(generator, max_batch=3, prefill_chunk=5)
    try:
        options = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}
        alone = []
        for prompt, images in requests:
            handle = scheduler.submit(prompt, images=images, **options)
            "".join(handle)
            alone.append(list(handle.tokens))
        first = scheduler.submit(requests[0][0], images=requests[0][1], **options)
        deadline = time.monotonic() + 60
        while len(first.tokens) < 2:  # the first row is decoding when the others join
            assert time.monotonic() < deadline, "the first row never decoded"
            time.sleep(0.005)
        joined = [scheduler.submit(p, images=i, **options) for p, i in requests[1:]]
        for handle in (first, *joined):
            "".join(handle)
        assert [list(h.tokens) for h in (first, *joined)] == alone
        assert all(len(tokens) == 12 for tokens in alone)
    finally:
        scheduler.close()


def test_chat_completions_put_an_image_part_where_the_llava_template_puts_it(http, served):
    prompt = "What is shown?"
    native = generate(http, prompt, [IMAGE]).json()["text"]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": data_url(IMAGE, "image/png")}},
            ],
        }
    ]
    with openai.OpenAI(
        base_url=f"{served.url}/v1", api_key=served.svc.user_key, max_retries=0, timeout=120
    ) as client:
        whole = client.chat.completions.create(
            model=LLM, messages=messages, max_tokens=GREEDY, temperature=0.0
        )
        stream = client.chat.completions.create(
            model=LLM, messages=messages, max_tokens=GREEDY, temperature=0.0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        models = client.models.list()
    assert whole.choices[0].message.content == native == streamed
    assert whole.model_extra["cachebind"]["neighbours"] == []
    llm = next(m for m in models.data if m.id == LLM)
    assert llm.model_extra["cachebind"]["mode"] == "llava"


def test_the_native_stream_of_an_image_prompt_is_its_whole_answer(http):
    whole = generate(http, "Describe it.", [OTHER]).json()
    body = {
        "prompt": "Describe it.",
        "inputs": [image_input(OTHER)],
        "max_new_tokens": GREEDY,
        "temperature": 0.0,
    }
    with http.stream("POST", "/v1/generate", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[0] == {"neighbours": []}
    assert "".join(e.get("text", "") for e in events[1:-1]) == whole["text"] == events[-1]["text"]


@pytest.mark.parametrize(
    ("extra", "error", "names"),
    [
        (
            {
                "inputs": [
                    {"modality": "audio", "data": base64.b64encode(audio_bytes("wav")).decode()}
                ]
            },
            "unsupported_modality",
            "audio",
        ),
        ({"inputs": [{"embedding": [0.1] * 64}]}, "unsupported_input", "embedding"),
        ({"inputs": [image_input(IMAGE) | {"weight": 2.0}]}, "unsupported_parameter", "weight"),
        ({"k": 4}, "unsupported_parameter", "k"),
        ({"prompt": "Look: <image>", "inputs": []}, "image_count", "1 <image> but 0 image"),
    ],
    ids=["audio", "raw-embedding", "mix-weight", "cache-blend", "forged-image-token"],
)
def test_what_llava_mode_cannot_take_is_refused_naming_why(http, extra, error, names):
    body = {"prompt": "Describe it.", "stream": False, "max_new_tokens": 2, **extra}
    r = http.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    answer = r.json()
    assert answer["error"] == error, answer
    assert names in json.dumps(answer)


def test_chat_audio_in_llava_mode_is_a_400_naming_the_modality(http):
    audio = {"data": base64.b64encode(audio_bytes("wav")).decode(), "format": "wav"}
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "input_audio", "input_audio": audio},
            ],
        }
    ]
    r = http.post("/v1/chat/completions", json={"model": LLM, "messages": messages})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "unsupported_modality" and "audio" in error["message"]


def test_serve_settings_load_a_llava_directory_and_name_a_missing_one(tmp_path):
    directory, _ = write_served_llava(tmp_path / "llava")
    llm = {
        "mode": "llava",
        "llava_dir": str(directory),
        "device": "cpu",
        "dtype": "float32",
        "max_batch": 1,
        "llava_max_seq_len": 256,  # below the model's 4096 positions: the setting holds
    }
    settings = Settings(
        weights={"dir": str(tmp_path / "weights")},
        encoder={"preset": "tiny", "device": "cpu", "dtype": "float32"},
        index={"dir": str(tmp_path / "index")},
        store={"uri": str(tmp_path / "db")},
        llm=llm,
    )
    runtime = Runtime.from_settings(settings)
    try:
        assert runtime.llm_mode == "llava"
        assert runtime.scheduler is not None and runtime.scheduler.max_seq_len == 256
    finally:
        runtime.scheduler.close()
    with pytest.raises(WeightsError, match="llm.llava_dir"):
        load_llava_generator(settings.llm.model_copy(update={"llava_dir": None}))


def row_id_of(served, row: int) -> int:
    return int(served.runtime.snapshot.table.ids()[row])


def test_a_cached_row_gives_the_tokens_of_sending_its_image_without_the_encoder(http, served):
    tower = served.runtime.generator.llava.vision_tower
    calls = []
    hook = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        sent = generate(http, "What is shown?", [IMAGE]).json()["text"]
        assert len(calls) == 1  # the tower encoded the sent image
        r = generate(http, "What is shown?", [], image_ids=[row_id_of(served, 0)])
        assert r.status_code == 200, r.text
        messages = [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": f"cachebind://rows/{row_id_of(served, 0)}"},
                    },
                    {"type": "text", "text": "What is shown?"},
                ],
            }
        ]
        chat = http.post(
            "/v1/chat/completions",
            json={"model": LLM, "messages": messages, "max_tokens": GREEDY, "temperature": 0.0},
        )
        assert chat.status_code == 200, chat.text
        assert len(calls) == 1  # the cached rows ran no encoder
    finally:
        hook.remove()
    assert r.json()["text"] == sent == chat.json()["choices"][0]["message"]["content"]
    # A cached row and a sent image in one prompt: the row's tokens first, then the image's.
    both = generate(http, "Compare them.", [OTHER], image_ids=[row_id_of(served, 0)])
    sent_both = generate(http, "Compare them.", [IMAGE, OTHER])
    assert both.status_code == 200 and both.json()["text"] == sent_both.json()["text"]


def test_a_row_that_is_not_in_the_cache_is_a_404_naming_it(http):
    r = generate(http, "What is shown?", [], image_ids=[12345])
    assert r.status_code == 404, r.text
    assert "image_ids[0]" in r.json()["detail"]
    past_int64 = generate(http, "What is shown?", [], image_ids=[2**63])
    assert past_int64.status_code == 422 and "image_ids" in past_int64.text
    url = {"url": "cachebind://rows/twelve"}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}]
    bad = http.post("/v1/chat/completions", json={"model": LLM, "messages": messages})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_row_id"


@pytest.mark.parametrize(
    ("change", "named"),
    [({"layer": -1}, "hidden state -1"), ({"cls": True}, "cls True"), ({"width": 1024}, "x 1024")],
    ids=["another-layer", "with-cls", "another-width"],
)
def test_cached_tokens_of_another_layout_are_refused_naming_both(served, change, named):
    generator = served.runtime.generator
    with pytest.raises(ApiError) as refused:
        check_recorded(
            RECORDED | change, generator.layout, generator.tower_states, "patch_tokens_clip336"
        )
    assert refused.value.status == 422 and refused.value.error == "token_mismatch"
    assert (
        named in refused.value.detail
        and "hidden state -2 (cls False) as 9 x 32" in refused.value.detail
    )
    check_recorded(
        RECORDED | {"layer": 2}, generator.layout, generator.tower_states, "x"
    )  # -2 of 4


# llava-hf/llava-1.5-7b-hf's published chat template (its chat_template.json).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_conversation_renders_as_the_llava_hf_chat_template_renders_it():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        {"role": "user", "content": [image, {"type": "text", "text": "And"}, image,
                                     {"type": "text", "text": "this?"}]},
    ]  # fmt: skip
    hf = [
        {"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_url" else p
                                        for p in m["content"]]}
        for m in messages
    ]  # fmt: skip
    env = jinja2.Environment(extensions=[GenerationTag])
    expected = env.from_string(LLAVA_HF_TEMPLATE).render(messages=hf, add_generation_prompt=True)
    ours = render_llava_chat([Message.model_validate(m) for m in messages])
    assert ours == expected
    assert ours.startswith("Be brief. USER: <image>\nWhat is it? ASSISTANT: A dog. USER: ")


class GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}`` block (it marks the assistant's text; renders it)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def test_the_llava_dir_flag_of_serve_chooses_llava_mode(tmp_path):
    args = build_parser().parse_args(["serve", "--llava-dir", str(tmp_path)])
    assert overrides_from(args)["llm"] == {"llava_dir": str(tmp_path), "mode": "llava"}


def metric(http: httpx.Client, name: str, labels: str = "") -> float:
    found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", http.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_until(condition, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_image_rows_share_the_schedulers_admission_429_cancellation_and_metrics(http, served):
    scheduler = served.runtime.scheduler
    image = PromptImages.of_pixels(torch.zeros(1, 3, 42, 42))
    label = '{reason="cancelled"}'
    cancelled = metric(http, "cachebind_generate_finished_total", label)
    hogs = [
        scheduler.submit("Describe it.", images=image, max_new_tokens=4000, ignore_eos=True)
        for _ in range(scheduler.max_batch)
    ]
    old_queue, scheduler.max_queue = scheduler.max_queue, 0
    try:
        wait_until(lambda: scheduler.running == scheduler.max_batch)
        r = generate(http, "What is shown?", [IMAGE])
        assert r.status_code == 429 and r.json()["error"] == "busy", r.text
        assert int(r.headers["Retry-After"]) >= 1
        occupancy = "cachebind_generate_batch_occupancy"
        wait_until(lambda: metric(http, occupancy) == scheduler.max_batch)
    finally:
        scheduler.max_queue = old_queue
        for hog in hogs:
            hog.cancel()
    wait_until(lambda: scheduler.running == 0)
    finished = "cachebind_generate_finished_total"
    wait_until(lambda: metric(http, finished, label) >= cancelled + scheduler.max_batch)
