"""The typed manifest: what a version says about itself, read and written in one place, and a
manifest written before the newer keys existed still loads and serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from builders import build_demo_cache, service_settings

import indexing
from cachebind.published.layout import MANIFEST_FILE, versions_dir
from cachebind.published.manifest import LEGACY_SET, Manifest, read_manifest, write_manifest
from cachebind.serve import start_server
from cachebind.store import CacheTable

NEWER_KEYS = (
    "format",
    "query_sets",
    "recall_by_modality",
    "search_params_by_modality",
    "storage",
    "files",
    "selection_reason",
    "parent_version",
    "shards",
)
"""Keys today's builder writes that the first manifests did not have."""


@pytest.fixture
def published(tmp_path: Path) -> tuple[Any, Any, dict[str, Any]]:
    cache = build_demo_cache(tmp_path, rows=200, dim=64)
    svc = service_settings(tmp_path, cache, index_poll_s=0)
    svc.settings.index.use_gpu = "no"
    manifest = indexing.build(
        CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
    )
    return cache, svc, manifest


def manifest_path(index_dir: Path | str, version: str) -> Path:
    return versions_dir(index_dir) / version / MANIFEST_FILE


def test_a_manifest_written_today_reads_as_a_manifest_and_writes_back_the_same_json(
    published, tmp_path: Path
) -> None:
    _, svc, built = published
    path = manifest_path(svc.settings.index.dir, built["version"])
    on_disk = json.loads(path.read_text())
    typed = read_manifest(svc.settings.index.dir, built["version"])
    assert typed.version == built["version"] and typed.index_key == on_disk["index_key"]
    assert typed.table.ids_sha256 == on_disk["table"]["ids_sha256"]
    assert typed.to_json() == on_disk
    # A key a newer cachebind adds survives a read and a write by this one.
    newer = on_disk | {"written_by_a_newer_build": {"what": ["kept"]}}
    again = write_manifest(tmp_path / "copy.json", newer)
    assert again.extra == {"written_by_a_newer_build": {"what": ["kept"]}}
    assert json.loads((tmp_path / "copy.json").read_text()) == newer


def test_a_manifest_from_before_query_sets_loads_serves_and_reports_its_one_held_out_set(
    published,
) -> None:
    cache, svc, built = published
    index_dir = svc.settings.index.dir
    path = manifest_path(index_dir, built["version"])
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in NEWER_KEYS}
    path.write_text(json.dumps(old))

    typed = read_manifest(index_dir, built["version"])
    assert [s["name"] for s in typed.query_sets] == [LEGACY_SET]
    assert typed.query_sets[0]["recall"] == old["recall"]
    assert typed.query_sets[0]["n"] == old["recall_queries"]["count"]
    assert typed.recall_by_modality["image"]["set"] == LEGACY_SET
    assert typed.storage == {"invlists": "memory"} and not typed.on_disk
    assert typed.files is None and typed.search_params_by_modality == {}
    assert indexing.verify_version(index_dir, built["version"]) == [
        f"{built['version']}: no file checksums recorded (built by an older cachebind)"
    ]

    table = CacheTable.open(cache.store)
    loaded = indexing.load_current(index_dir, table, use_gpu="no")
    ids = table.ids()[:5]
    _, found = loaded.search(table.vectors(ids.tolist()), 1)
    np.testing.assert_array_equal(found[:, 0], ids)

    user = {"Authorization": f"Bearer {svc.user_key}"}
    with start_server(svc.settings, port=0) as server:
        http = httpx.Client(base_url=server.url, headers=user, timeout=60)
        info = http.get("/v1/index").json()
        assert info["version"] == built["version"]
        assert [s["name"] for s in info["query_sets"]] == [LEGACY_SET]
        assert info["recall_by_modality"]["image"]["set"] == LEGACY_SET
        query = table.vectors(ids[:1].tolist())[0].tolist()
        r = http.post(
            "/v1/search", json={"inputs": [{"embedding": query, "modality": "image"}], "k": 1}
        )
        assert r.status_code == 200, r.text
        assert r.json()["recall"]["set"] == LEGACY_SET


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda m: m.pop("table"), "'table'"),
        (lambda m: m["table"].pop("ids_sha256"), "'ids_sha256'"),
        (lambda m: m.pop("index_key"), "'index_key'"),
        (lambda m: m.__setitem__("table", [1, 2]), "'table' must be an object"),
    ],
    ids=["no table", "no id checksum", "no index key", "table not an object"],
)
def test_a_manifest_missing_what_a_reader_needs_is_refused_naming_its_file_and_the_key(
    published, damage, named: str
) -> None:
    _, svc, built = published
    path = manifest_path(svc.settings.index.dir, built["version"])
    manifest = json.loads(path.read_text())
    damage(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{built['version']}.manifest\.json: .*{named}"):
        read_manifest(svc.settings.index.dir, built["version"])


def test_a_staged_manifest_has_no_version_until_publishing_names_it(published) -> None:
    _, svc, built = published
    typed = read_manifest(svc.settings.index.dir, built["version"])
    staged = Manifest.from_json(typed.to_json() | {"version": None})
    assert staged.version is None and staged.to_json()["version"] is None
    assert staged.with_version("v000009").version == "v000009"
