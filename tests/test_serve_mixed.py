"""Specification of SPHINX's mixed embedding served in tokens mode (``cachebind serve
--mixed-projector``): an image is encoded by each of the projector's encoders (ImageBind's
trunk, CLIP ViT-L/14-336, DINOv2, each with its own transform), their patch tokens resampled
to the projector's grid, concatenated channel by channel, projected, and placed where
``<image>`` stands; a cached row gives the same answer from its stored tokens with no encoder
run; encoders or cached tokens other than the ones the projector learnt on are refused.

The oracle is computed apart: CLIP's and DINOv2's tokens by transformers' own models and image
processors from the checkpoint directories, the projection written out by hand (bilinear
resampling, Linear, LayerNorm), and the answer by transformers' LLaMA ``generate`` from those
input embeddings."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from builders import TableFlatLoader, demo_rows, service_settings
from extra_checkpoints import write_clip, write_dinov2
from fixtures_media import audio_bytes
from hostile_media import png
from llava_checkpoints import CACHED_IMAGES, write_served_llava
from openai_calls import LLM
from PIL import Image
from transformers import BitImageProcessor, CLIPImageProcessor, CLIPVisionModel, Dinov2Model

from cachebind.bind.mixed import (
    MixedProjector,
    TokenSource,
    load_mixed_projector,
    save_mixed_projector,
)
from cachebind.cli import build_parser, overrides_from
from cachebind.config import Settings, StoreConfig
from cachebind.encode import Encoder
from cachebind.encode.extra import ExtraEncoder, extra_identity, read_config
from cachebind.errors import WeightsError
from cachebind.inject.llava_prompt import IMAGE_INDEX
from cachebind.inject.llava_serve import PromptImage, PromptImages
from cachebind.inject.mixed_serve import MixedGenerator
from cachebind.inject.served import load_served_llm
from cachebind.preprocess.extra import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESS,
    image_pixel_sets,
    spec_tensor,
)
from cachebind.preprocess.image import image_tensor
from cachebind.serve import start_server
from cachebind.serve.runtime import Runtime
from cachebind.store import connect, images_schema

GREEDY = 8
ROWS = 6
SIDE = 4  # the common grid: the trunk's 16 x 16 and CLIP's 6 x 6 shrink to it, DINOv2's stays
LAYER = -2
IMAGE, OTHER = CACHED_IMAGES
TOKENS = {"layer": LAYER, "dtype": "float16", "cls": False}


def canonical(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)


def write_table(root: Path, trunk: Encoder, extras: dict[str, ExtraEncoder], dirs) -> StoreConfig:
    """A table in the embedding job's layout with the trunk's, CLIP's and DINOv2's patch tokens:
    row i < 2 of ``CACHED_IMAGES[i]`` (as each encoder's own code embeds it), the rest random."""
    base = demo_rows(0, ROWS, 64, seed=0, encoder=dict(trunk.identity))
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in CACHED_IMAGES]
    rng = np.random.default_rng(0)
    columns = {name: base[name] for name in base.schema.names}
    metadata: dict = {"encoder": dict(trunk.identity), "extra_encoders": {}}

    def column(known: torch.Tensor) -> pa.Array:
        rest = rng.standard_normal((ROWS - len(known), *known.shape[1:])).astype(np.float16)
        values = np.concatenate([known.numpy().astype(np.float16), rest]).reshape(ROWS, -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])

    _, trunk_tokens = trunk.encode_image_tokens(
        torch.stack([image_tensor(i) for i in images]), LAYER
    )
    columns["patch_tokens"] = column(trunk_tokens)
    metadata["tokens"] = {
        **TOKENS,
        "patches": trunk_tokens.shape[1],
        "width": trunk_tokens.shape[2],
    }
    extra_sizes = {}
    for name, encoder in extras.items():
        pixels = torch.stack([spec_tensor(i, PREPROCESS[name]) for i in images])
        vectors, tokens = encoder.encode(pixels, LAYER)
        assert tokens is not None
        rows = np.concatenate([vectors.numpy(), rng.standard_normal((ROWS - 2, vectors.shape[1]))])
        columns[f"vector_{name}"] = pa.FixedSizeListArray.from_arrays(
            pa.array(rows.astype(np.float16).ravel()), vectors.shape[1]
        )
        columns[f"patch_tokens_{name}"] = column(tokens)
        shape = {"patches": tokens.shape[1], "width": tokens.shape[2]}
        identity = extra_identity(name, dirs[name], read_config(name, dirs[name]))
        metadata["extra_encoders"][name] = {**identity, "tokens": {**TOKENS, **shape}}
        extra_sizes[name] = (vectors.shape[1], tokens.shape[1] * tokens.shape[2])
    schema = images_schema(
        dtype="float16",
        dim=64,
        tokens=trunk_tokens.shape[1] * trunk_tokens.shape[2],
        extra=extra_sizes,
        metadata=metadata,
    )
    store = StoreConfig(uri=str(root / "lancedb"), table="images")
    connect(store).create_table(store.table, pa.table(columns, schema=schema), mode="overwrite")
    return store


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory):
    """A server of a mixed projector over the trunk, CLIP and DINOv2, with a small LLaVA's LLM."""
    root = tmp_path_factory.mktemp("mixed")
    llava_dir, reference = write_served_llava(root / "llava")
    dirs = {"clip336": write_clip(root / "clip"), "dinov2": write_dinov2(root / "dino")}
    extras = {name: ExtraEncoder.load(name, d) for name, d in dirs.items()}
    probe = Settings(encoder={"preset": "tiny", "device": "cpu", "dtype": "float32"})
    trunk = Encoder.from_config(probe.encoder, probe.weights)
    store = write_table(root, trunk, extras, dirs)
    from cachebind.store import CacheTable

    table = CacheTable.open(store)
    sources = []
    for name in ("imagebind", "clip336", "dinov2"):
        record = table.tokens_record(name)
        sources.append(
            TokenSource(name, record.patches, record.width, record.layer, record.identity)
        )
    torch.manual_seed(3)
    projector = MixedProjector(sources, text_dim=48, side=SIDE)
    with torch.no_grad():  # LayerNorm's affine away from (1, 0), so the test sees it
        projector.visual_proj[1].weight.uniform_(0.5, 1.5)
        projector.visual_proj[1].bias.uniform_(-0.2, 0.2)
    path = root / "mixed_projector.pth"
    save_mixed_projector(projector, path, torch.float32)

    from builders import DemoCache

    svc = service_settings(root, DemoCache(store=store, dim=64, rows=ROWS), max_inputs=4)
    settings = svc.settings
    settings.llm = settings.llm.model_copy(
        update={
            "mode": "llava", "llava_dir": llava_dir, "mixed_projector": path,
            "device": "cpu", "dtype": "float32",
        }
    )  # fmt: skip
    settings.embed = settings.embed.model_copy(update={"extra_encoders": dirs})
    generator = load_served_llm(settings, trunk)
    loader = TableFlatLoader(store)
    runtime = Runtime(trunk, snapshot=loader.load(), loader=loader, generator=generator)
    server = start_server(settings, runtime, port=0)
    headers = {"Authorization": f"Bearer {svc.user_key}"}
    client = httpx.Client(base_url=server.url, headers=headers, timeout=120)
    try:
        yield {
            "http": client, "runtime": runtime, "generator": generator, "settings": settings,
            "reference": reference, "dirs": dirs, "trunk": trunk, "path": path,
            "projector": projector, "root": root,
        }  # fmt: skip
    finally:
        client.close()
        server.stop()


def oracle_visual(mixed, image: bytes) -> torch.Tensor:
    """[SIDE², 48] visual tokens of ``image``, computed apart from cachebind's serving code."""
    img = Image.open(io.BytesIO(image)).convert("RGB")
    dirs = mixed["dirs"]
    clip_pixels = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336)(
        images=img, return_tensors="pt"
    )["pixel_values"]
    dino_processor = BitImageProcessor(
        size={"shortest_edge": 256}, crop_size=224, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    dino_pixels = dino_processor(images=img, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        clip = CLIPVisionModel.from_pretrained(dirs["clip336"], attn_implementation="eager")
        dino = Dinov2Model.from_pretrained(dirs["dinov2"], attn_implementation="eager")
        grids = [
            mixed["trunk"].encode_image_tokens(image_tensor(img)[None], LAYER)[1],
            clip(pixel_values=clip_pixels, output_hidden_states=True).hidden_states[LAYER][:, 1:],
            dino(pixel_values=dino_pixels, output_hidden_states=True).hidden_states[LAYER][:, 1:],
        ]
    maps = []
    for tokens in grids:
        tokens = tokens.to(torch.float16).float()[0]  # what a cache stores
        have = int(tokens.shape[0] ** 0.5)
        grid = tokens.T.reshape(1, -1, have, have)
        out = F.interpolate(grid, size=(SIDE, SIDE), mode="bilinear", align_corners=False,
                            antialias=have > SIDE)  # fmt: skip
        maps.append(out.reshape(-1, SIDE * SIDE).T)
    x = torch.cat(maps, dim=1)  # channels: trunk, CLIP, DINOv2
    state = mixed["projector"].state_dict()
    y = x @ state["visual_proj.0.weight"].T + state["visual_proj.0.bias"]
    return F.layer_norm(y, (48,), state["visual_proj.1.weight"], state["visual_proj.1.bias"])


def oracle_greedy(mixed, ids: list[int], images: list[bytes]) -> list[int]:
    """transformers' LLaMA ``generate`` (greedy) from the oracle's input embeddings."""
    llm = mixed["reference"].model.language_model
    lm_head = mixed["reference"].lm_head
    row = torch.tensor(ids)
    embeds = llm.get_input_embeddings()(row.clamp(min=0))
    visual = torch.cat([oracle_visual(mixed, image) for image in images])
    embeds[row == IMAGE_INDEX] = visual.to(embeds.dtype)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(GREEDY):  # plain greedy decoding over the whole sequence each step
            hidden = llm(inputs_embeds=embeds[None]).last_hidden_state
            token = int(lm_head(hidden[0, -1]).argmax())
            if token == 2:
                break
            out.append(token)
            embeds = torch.cat([embeds, llm.get_input_embeddings()(torch.tensor([token]))])
    return out


def generate(http, prompt: str, images: list[bytes], **extra) -> httpx.Response:
    body = {
        "prompt": prompt,
        "inputs": [{"modality": "image", "data": base64.b64encode(i).decode()} for i in images],
        "stream": False,
        "max_new_tokens": GREEDY,
        "temperature": 0.0,
        **extra,
    }
    return http.post("/v1/generate", json=body)


def prompt_ids(generator: MixedGenerator, prompt: str, n: int) -> list[int]:
    images = PromptImages(tuple(PromptImage(patch_tokens=torch.zeros(1)) for _ in range(n)))
    return generator.prompt_ids(prompt, template=True, images=images)


def row_id_of(mixed, row: int) -> int:
    return int(mixed["runtime"].snapshot.table.ids()[row])


def test_an_image_gets_the_tokens_of_three_encoders_mixed_projected_and_placed(mixed):
    generator = mixed["generator"]
    assert isinstance(generator, MixedGenerator)
    ids = prompt_ids(generator, "What is in the picture?", 1)
    assert ids.count(IMAGE_INDEX) == SIDE * SIDE  # one position per cell of the common grid
    # The visual tokens themselves, from the bytes as the service decodes them.
    limits = mixed["settings"].input
    pixels = image_pixel_sets("image", IMAGE, limits=limits, specs=generator.pixel_specs)
    visual = generator.visual_tokens(generator.encode_images([p[None] for p in pixels]))[0]
    torch.testing.assert_close(visual, oracle_visual(mixed, IMAGE), atol=1e-4, rtol=1e-4)
    expected = oracle_greedy(mixed, ids, [IMAGE])
    assert len(expected) >= 3  # an answer long enough to tell models apart
    r = generate(mixed["http"], "What is in the picture?", [IMAGE])
    assert r.status_code == 200, r.text
    assert r.json()["text"] == generator.tokenizer.decode(expected)
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    models = mixed["http"].get("/v1/models").json()["data"]
    assert any(m.get("cachebind", {}).get("model") == "sphinx-mixed" for m in models)


def test_cached_rows_give_the_answer_of_sending_their_images_and_run_no_encoder(mixed, monkeypatch):
    http, generator = mixed["http"], mixed["generator"]
    sent = generate(http, "Compare them.", [IMAGE, OTHER])
    assert sent.status_code == 200, sent.text
    calls = []
    original = generator.encode
    monkeypatch.setattr(generator, "encode", lambda px: calls.append(1) or original(px))
    rows = [row_id_of(mixed, 0), row_id_of(mixed, 1)]
    cached = generate(http, "Compare them.", [], image_ids=rows)
    assert cached.status_code == 200, cached.text
    messages = [
        {
            "role": "user",
            "content": [
                *(
                    {"type": "image_url", "image_url": {"url": f"cachebind://rows/{r}"}}
                    for r in rows
                ),
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    chat = http.post(
        "/v1/chat/completions",
        json={"model": LLM, "messages": messages, "max_tokens": GREEDY, "temperature": 0.0},
    )
    assert chat.status_code == 200, chat.text
    assert calls == []  # the stored tokens stood in for every encoder
    assert cached.json()["text"] == sent.json()["text"]
    assert chat.json()["choices"][0]["message"]["content"] == sent.json()["text"]


def test_cached_tokens_of_another_layer_or_encoder_are_refused_naming_both(mixed, monkeypatch):
    table = mixed["runtime"].snapshot.table
    real = table.tokens_record

    def recorded(change):
        def tokens_record(encoder=None):
            record = real(encoder)
            return type(record)(**{**record.__dict__, **change}) if encoder == "dinov2" else record

        return tokens_record

    monkeypatch.setattr(table, "tokens_record", recorded({"layer": 1}))
    r = generate(mixed["http"], "Hi", [], image_ids=[row_id_of(mixed, 0)])
    assert r.status_code == 422 and r.json()["error"] == "token_mismatch", r.text
    assert "patch_tokens_dinov2 holds hidden state 1" in r.text and "hidden state -2" in r.text
    other = canonical({"model": "dinov2", "weights": "sha256:" + "0" * 64})
    monkeypatch.setattr(table, "tokens_record", recorded({"identity": other}))
    r = generate(mixed["http"], "Hi", [], image_ids=[row_id_of(mixed, 0)])
    assert r.status_code == 422 and "another dinov2" in r.text, r.text
    assert "sha256:" + "0" * 64 in r.text


def test_an_encoder_other_than_the_one_learnt_on_is_refused_at_load(mixed, tmp_path):
    settings = mixed["settings"]
    other = write_dinov2(tmp_path / "other-dino", seed=7)
    dirs = {**mixed["dirs"], "dinov2": other}
    changed = settings.model_copy(
        update={"embed": settings.embed.model_copy(update={"extra_encoders": dirs})}
    )
    with pytest.raises(
        WeightsError, match="dinov2 .* is not the encoder the mixed projector learnt on: weights"
    ):
        load_served_llm(changed, mixed["trunk"])
    missing = {"clip336": mixed["dirs"]["clip336"]}
    changed = settings.model_copy(
        update={"embed": settings.embed.model_copy(update={"extra_encoders": missing})}
    )
    with pytest.raises(WeightsError, match="set embed.extra_encoders.dinov2"):
        load_served_llm(changed, mixed["trunk"])


def test_the_projector_file_records_what_serving_checks_and_refuses_an_old_one(mixed, tmp_path):
    loaded = load_mixed_projector(mixed["path"])
    assert [(s.name, s.layer) for s in loaded.sources] == [
        ("imagebind", LAYER), ("clip336", LAYER), ("dinov2", LAYER)
    ]  # fmt: skip
    assert json.loads(loaded.sources[2].identity)["weights"].startswith("sha256:")
    for key, value in mixed["projector"].state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    saved = torch.load(mixed["path"], weights_only=True)
    saved["sources"] = [(s["name"], s["patches"], s["width"]) for s in saved["sources"]]
    old = tmp_path / "old.pth"
    torch.save(saved, old)
    with pytest.raises(WeightsError, match="records no token layer"):
        load_mixed_projector(old)


def test_the_mixed_projector_flag_of_serve_chooses_tokens_mode(tmp_path):
    args = build_parser().parse_args(
        ["serve", "--mixed-projector", str(tmp_path / "m.pth"), "--llama-dir", str(tmp_path)]
    )
    assert overrides_from(args)["llm"] == {
        "mixed_projector": str(tmp_path / "m.pth"), "llama_dir": str(tmp_path), "mode": "llava"
    }  # fmt: skip


def test_hostile_or_foreign_images_are_refused_naming_the_input_and_the_server_goes_on(mixed):
    http = mixed["http"]
    bomb = png(9000, 9000)  # 81 Mpixels (324 MB of RGBA) in a few hundred KB
    cases = [
        (IMAGE[: len(IMAGE) // 2], "truncated"),
        (bomb, "pixel budget"),
        (b"\x00" * 64, "not an image"),
    ]
    for data, what in cases:
        r = generate(http, "What is it?", [data])
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert "inputs[0]" in r.text, (what, r.text)
    sound = http.post(
        "/v1/generate",
        json={"prompt": "Hi", "inputs": [{"modality": "audio", "data": base64.b64encode(
            audio_bytes("wav")).decode()}], "max_new_tokens": 2},
    )  # fmt: skip
    assert sound.status_code == 422 and sound.json()["error"] == "unsupported_modality"
    # Each encoder took its own transform of the one decode; a well-formed image still answers.
    assert generate(http, "What is it?", [OTHER]).status_code == 200
