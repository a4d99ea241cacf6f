"""cachebind.client.CachebindClient against a real server (and the in-process mode the CLI uses)."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from builders import build_demo_cache, service_settings
from PIL import Image

import indexing
from cachebind.client import CachebindAPIError, CachebindClient, input_item
from cachebind.store import CacheTable, row_id


def png(colour=(10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), colour).save(buf, format="PNG")
    return buf.getvalue()


pytestmark = pytest.mark.served(rows=150, llm=True)


@pytest.fixture
def client(served):
    with CachebindClient(served.url, api_key=served.svc.user_key, timeout=30) as c:
        yield c


def test_input_item_shapes():
    assert input_item("text", "a dog") == {"modality": "text", "text": "a dog", "weight": 1.0}
    item = input_item("image", b"\x89PNG", weight=0.5)
    assert item == {
        "modality": "image",
        "data": base64.b64encode(b"\x89PNG").decode(),
        "weight": 0.5,
    }
    assert input_item(None, np.ones(3))["embedding"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="modality"):
        input_item(None, b"bytes")


def test_embed_and_embed_files_agree(client, served):
    runtime = served.runtime
    picture = png()
    by_json = client.embed([input_item("image", picture), input_item("text", "a boat")])
    by_upload = client.embed_files("image", [picture])
    assert by_json["dim"] == 64 and by_json["encoder"]["preset"] == "tiny"
    np.testing.assert_allclose(
        by_json["items"][0]["embedding"], by_upload["items"][0]["embedding"], atol=1e-6
    )
    np.testing.assert_allclose(
        by_json["items"][1]["embedding"], runtime.encoder.embed("text", ["a boat"])[0], atol=1e-5
    )


def test_search_pages_through_cursor(client, served):
    table = served.runtime.snapshot.table
    query = [input_item(None, table.vectors([row_id("sample-000011")])[0])]
    first = client.search(query, k=5)
    assert first["results"][0]["key"] == "sample-000011"
    second = client.search(query, k=5, cursor=first["next_cursor"])
    both = client.search(query, k=10)
    assert [h["id"] for h in first["results"] + second["results"]] == [
        h["id"] for h in both["results"]
    ]
    filtered = client.search(query, k=5, filter="caption LIKE '%cat%'", dedup=0.5)
    assert all("cat" in h["caption"] for h in filtered["results"])
    assert client.image(first["results"][0]["id"])[:2] == b"\xff\xd8"  # JPEG


def test_enhance_and_generate(client):
    items = [input_item("image", png()), input_item("text", "a red car", weight=0.5)]
    enhanced = client.enhance(items, k=4, t=20.0, alpha=0.5)
    assert len(enhanced["neighbours"]) == 4
    assert -1.0 <= enhanced["cosine_to_query"] <= 1.0
    streamed = list(client.generate("What is it?", items, max_new_tokens=10, temperature=0.0))
    assert streamed and all(isinstance(p, str) for p in streamed)
    whole = client.generate_text("What is it?", items, max_new_tokens=10, temperature=0.0)
    assert whole["text"] == "".join(streamed)


def test_errors_raise_with_status_and_tag(client, served):
    server, svc = served.server, served.svc
    with pytest.raises(CachebindAPIError) as err:
        client.search([input_item("text", "x")], k=5000)
    assert err.value.status == 422 and err.value.error == "k_out_of_range"
    with pytest.raises(CachebindAPIError) as err:
        client.reload()
    assert err.value.status == 403
    with pytest.raises(CachebindAPIError) as err:
        list(client.generate("hi", [input_item("image", b"not an image")]))
    assert err.value.status == 422 and err.value.error == "undecodable"
    with CachebindClient(server.url, api_key=svc.admin_key) as admin:
        assert admin.reload(force=True)["reloaded"] is True
    with CachebindClient(server.url) as anonymous:
        assert anonymous.health() == {"status": "ok"}
        with pytest.raises(CachebindAPIError) as err:
            anonymous.index_info()
        assert err.value.status == 401


def test_index_info_and_ready(client):
    info = client.index_info()
    assert info["version"] == "flat-v1" and info["rows"] == 150 and info["dim"] == 64
    assert client.ready()["ready"] is True


def test_in_process_client_serves_the_published_index(tmp_path):
    cache = build_demo_cache(tmp_path, rows=60, dim=64)
    settings = service_settings(tmp_path, cache).settings
    settings.index.use_gpu = "no"
    indexing.build(
        CacheTable.open(cache.store), settings.index, indexing.BuildOptions(progress=False)
    )
    with CachebindClient.in_process(settings) as client:
        hits = client.search([input_item("text", "a green tree")], k=3)
        assert len(hits["results"]) == 3
        assert client.index_info()["rows"] == 60
        url = client.base_url
    assert url.startswith("http://127.0.0.1:")


def test_a_seed_gives_the_same_text_streamed_whole_and_through_the_raw_api(client, served):
    items = [input_item("image", png())]
    options = {"max_new_tokens": 10, "temperature": 0.9, "seed": 7}
    streamed = ["".join(client.generate("What is it?", items, **options)) for _ in range(2)]
    whole = [client.generate_text("What is it?", items, **options)["text"] for _ in range(2)]
    raw = httpx.post(
        f"{served.url}/v1/generate",
        json={"prompt": "What is it?", "inputs": items, "stream": False, **options},
        headers={"Authorization": f"Bearer {served.svc.user_key}"},
        timeout=60,
    ).json()["text"]
    assert streamed == whole == [raw, raw]
    other = client.generate_text("What is it?", items, **{**options, "seed": 8})["text"]
    third = client.generate_text("What is it?", items, **{**options, "seed": 9})["text"]
    assert len({raw, other, third}) > 1  # the seed is what made them equal


def test_a_stream_holds_its_neighbours_finish_reason_and_usage(client):
    items = [input_item("image", png())]
    whole = client.generate_text("What is it?", items, max_new_tokens=8, temperature=0.0, k=3)
    stream = client.generate("What is it?", items, max_new_tokens=8, temperature=0.0, k=3)
    text = "".join(stream)
    assert stream.neighbours == whole["neighbours"] and len(stream.neighbours) == 3
    assert (text, stream.text) == (whole["text"], whole["text"])
    assert stream.finish_reason == whole["finish_reason"]
    assert stream.usage == whole["usage"]


def test_results_convert_to_a_dataframe_and_an_arrow_table(client):
    hits = client.search([input_item("text", "a dog")], k=7)
    frame = hits.to_pandas()
    table = hits.to_arrow()
    assert len(frame) == table.num_rows == 7
    assert (
        frame["id"].tolist() == table.column("id").to_pylist() == [h["id"] for h in hits["results"]]
    )
    assert frame["score"].is_monotonic_decreasing
    embedded = client.embed([input_item("text", "a"), input_item("text", "b")]).to_pandas()
    assert embedded["embedding"].map(len).tolist() == [64, 64]
    neighbours = client.enhance([input_item("text", "a dog")], k=4).to_arrow()
    assert neighbours.column_names[:3] == ["id", "similarity", "weight"]


# The client package alone: what a user without the server stack has.
LIGHT_CLIENT = """
import importlib.abc, sys
BLOCKED = {"numpy", "torch", "pandas", "pyarrow", "fastapi", "starlette", "pydantic", "ray",
           "lancedb", "faiss", "uvicorn", "PIL", "av", "transformers"}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the light client imported {name}")

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, sys.argv[1])
from cachebind.client import CachebindClient, input_item
import cachebind.client
assert cachebind.client.__file__.startswith(sys.argv[1]), cachebind.client.__file__
with CachebindClient(sys.argv[2], api_key=sys.argv[3]) as client:
    hits = client.search([input_item("text", "a dog")], k=3)
    stream = client.generate("Hi", max_new_tokens=4, temperature=0.0)
    print(len(hits["results"]), "".join(stream) == stream.text, stream.finish_reason)
"""


def test_the_client_package_installs_and_works_without_the_server_stack(served, tmp_path):
    source = Path(__file__).resolve().parents[1] / "clients" / "python"
    project = tmp_path / "project"
    shutil.copytree(source, project)  # follows the links to the service's own modules
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(project), "-w", str(tmp_path / "dist")],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("cachebind_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        archive.extractall(tmp_path / "site")
    assert sorted(n for n in names if n.startswith("cachebind/")) == [
        "cachebind/__init__.py", "cachebind/client.py", "cachebind/modalities.py"
    ]  # fmt: skip
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    assert [r for r in requires if "extra ==" not in r] == ["Requires-Dist: httpx==0.28.1"]
    out = subprocess.run(
        [sys.executable, "-c", LIGHT_CLIENT, str(tmp_path / "site"), served.url,
         served.svc.user_key],
        check=True, timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert out.stdout.split() == ["3", "True", out.stdout.split()[2]]
    assert out.stdout.split()[2] in ("stop", "length")
