"""Specification of search by an extra encoder: ``POST /v1/search/{encoder}`` encodes the sent
image with that encoder (DINOv2 here, a small random checkpoint in its published layout) and
searches the published index of its ``vector_<encoder>`` column, through a real server."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch
from builders import DemoCache, demo_rows, service_settings
from extra_checkpoints import WIDTH, write_dinov2
from fixtures_media import audio_bytes, image_bytes

import indexing
from cachebind.config import IndexConfig, StoreConfig
from cachebind.encode.extra import ExtraEncoder
from cachebind.errors import WeightsError
from cachebind.preprocess.extra import extra_tensor
from cachebind.preprocess.image import load_image
from cachebind.published.layout import CURRENT_FILE
from cachebind.serve import start_server
from cachebind.serve.extra_search import load_extra_searches
from cachebind.serve.runtime import Runtime
from cachebind.store import CacheTable, connect, images_schema

ROWS = 16
IMAGES = [image_bytes(size=(64 + 8 * i, 48), seed=i) for i in range(ROWS)]


def dinov2_cache(root: Path, encoder: ExtraEncoder) -> DemoCache:
    """A table whose ``vector_dinov2`` is the encoder's vector of ``IMAGES[i]`` in row i."""
    pixels = torch.stack([extra_tensor(load_image(b), "dinov2") for b in IMAGES])
    vectors, _ = encoder.encode(pixels)
    base = demo_rows(0, ROWS, 64, seed=0)
    schema = images_schema(
        dtype="float16", dim=64, extra={"dinov2": (WIDTH, 0)}, metadata={"encoder": "fixture"}
    )
    columns = {name: base[name] for name in base.schema.names}
    flat = pa.array(vectors.numpy().astype(np.float16).ravel())
    columns["vector_dinov2"] = pa.FixedSizeListArray.from_arrays(flat, WIDTH)
    store = StoreConfig(uri=str(root / "lancedb"), table="images")
    connect(store).create_table(store.table, pa.table(columns, schema=schema), mode="overwrite")
    return DemoCache(store=store, dim=64, rows=ROWS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra-search")
    checkpoint = write_dinov2(root / "dinov2")
    cache = dinov2_cache(root, ExtraEncoder.load("dinov2", checkpoint))
    index_dir = root / "index-dinov2"
    table = CacheTable.open(cache.store, column="vector_dinov2")
    config = IndexConfig(dir=index_dir, use_gpu="no", column="vector_dinov2")
    indexing.build(table, config, indexing.BuildOptions(progress=False))
    svc = service_settings(root, cache, index_poll_s=0, extra_indexes={"dinov2": str(index_dir)})
    svc.settings.embed.extra_encoders = {"dinov2": checkpoint}
    runtime = Runtime.from_settings(svc.settings)  # no ImageBind index: it searches alone
    server = start_server(svc.settings, runtime, port=0)
    headers = {"Authorization": f"Bearer {svc.user_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        yield http, table, svc
    server.stop()


def image_input(data: bytes) -> dict:
    return {"modality": "image", "data": base64.b64encode(data).decode()}


def test_an_image_finds_its_own_row_by_the_extra_encoders_vector(served):
    http, table, _ = served
    ids = table.ids()
    for i in (0, 5, ROWS - 1):
        r = http.post("/v1/search/dinov2", json={"input": image_input(IMAGES[i]), "k": 3})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["encoder"] == "dinov2" and answer["column"] == "vector_dinov2"
        hits = answer["results"]
        assert len(hits) == 3 and int(hits[0]["id"]) == int(ids[i])
        assert hits[0]["score"] > hits[1]["score"] and hits[0]["key"] == f"sample-{i:06d}"


def test_what_an_extra_search_cannot_take_is_refused_naming_it(served):
    http, _, _ = served
    unknown = http.post("/v1/search/clip336", json={"input": image_input(IMAGES[0])})
    assert unknown.status_code == 404 and "served: dinov2" in unknown.json()["detail"]
    audio = {"modality": "audio", "data": base64.b64encode(audio_bytes("wav")).decode()}
    sound = http.post("/v1/search/dinov2", json={"input": audio})
    assert sound.status_code == 422 and sound.json()["error"] == "unsupported_modality"
    too_many = http.post("/v1/search/dinov2", json={"input": image_input(IMAGES[0]), "k": 10**6})
    assert too_many.status_code == 422 and too_many.json()["error"] == "k_out_of_range"


def test_an_extra_index_without_its_encoders_checkpoint_is_refused_naming_both(served):
    _, _, svc = served
    settings = svc.settings
    bare = settings.model_copy(
        update={"embed": settings.embed.model_copy(update={"extra_encoders": {}})}
    )
    with pytest.raises(WeightsError, match="serve.extra_indexes.*embed.extra_encoders"):
        load_extra_searches(bare)


NEW_IMAGES = [image_bytes(size=(40, 90 + 6 * i), seed=100 + i) for i in range(4)]


def test_a_newly_published_extra_index_is_served_after_a_reload_and_a_broken_one_is_not(served):
    http, _, svc = served
    admin = {"Authorization": f"Bearer {svc.admin_key}"}
    store, index_dir = svc.settings.store, Path(svc.settings.serve.extra_indexes["dinov2"])
    old_version = http.post("/v1/admin/reload", headers=admin).json()["extra_versions"]["dinov2"]
    # Four new rows (their DINOv2 vectors), and a new index version built from them all.
    encoder = ExtraEncoder.load("dinov2", svc.settings.embed.extra_encoders["dinov2"])
    pixels = torch.stack([extra_tensor(load_image(b), "dinov2") for b in NEW_IMAGES])
    vectors, _ = encoder.encode(pixels)
    base = demo_rows(ROWS, len(NEW_IMAGES), 64, seed=0)
    columns = {name: base[name] for name in base.schema.names}
    flat = pa.array(vectors.numpy().astype(np.float16).ravel())
    columns["vector_dinov2"] = pa.FixedSizeListArray.from_arrays(flat, WIDTH)
    table = connect(store).open_table(store.table)
    table.add(pa.table(columns).select(table.schema.names).cast(table.schema))
    grown = CacheTable.open(store, column="vector_dinov2")
    config = IndexConfig(dir=index_dir, use_gpu="no", column="vector_dinov2")
    indexing.build(grown, config, indexing.BuildOptions(progress=False))

    before = http.post("/v1/search/dinov2", json={"input": image_input(NEW_IMAGES[2]), "k": 1})
    assert before.json()["index_version"] == old_version  # nothing swapped until a reload
    reload = http.post("/v1/admin/reload", headers=admin)
    assert reload.status_code == 200, reload.text
    new_version = reload.json()["extra_versions"]["dinov2"]
    assert reload.json()["reloaded"] and new_version != old_version
    after = http.post("/v1/search/dinov2", json={"input": image_input(NEW_IMAGES[2]), "k": 1})
    assert after.json()["index_version"] == new_version
    hit = after.json()["results"][0]
    assert hit["key"] == f"sample-{ROWS + 2:06d}" and int(hit["id"]) in grown.ids().tolist()

    # CURRENT naming a version that is not there: a 409 naming it, the served version kept.
    current = index_dir / CURRENT_FILE
    published = current.read_text()
    current.write_text("v999999")
    try:
        broken = http.post("/v1/admin/reload", headers=admin)
        assert broken.status_code == 409, broken.text
        assert "v999999" in broken.text
        kept = http.post("/v1/search/dinov2", json={"input": image_input(NEW_IMAGES[2]), "k": 1})
        assert kept.status_code == 200 and kept.json()["index_version"] == new_version
    finally:
        current.write_text(published)
