"""Bounded disk: the store's gc removes the table versions the retention allows, never one a
published index version reads (Lance tags), reports what it freed, and leaves a table whose
directory holds about its live data."""

from __future__ import annotations

import json
from pathlib import Path

import lance
from tables import append_rows, make_images_table

import indexing
from cachebind.cli import main as cli_main
from cachebind.config import IndexConfig, Settings
from cachebind.store import CacheTable
from cachebind.store.gc import collect_store
from indexing.versions.retention import collect, pinned, tag_prefix

DIM = 16


def versions(uri: str) -> list[int]:
    return [int(v["version"]) for v in lance.dataset(uri).versions()]


def test_gc_keeps_what_published_indexes_read_and_frees_the_rest(tmp_path: Path) -> None:
    store = make_images_table(tmp_path / "db", 300, DIM, seed=0)
    for i in range(3):
        append_rows(store, 100, DIM, seed=i + 1, start=300 + 100 * i)
    settings = Settings(store=store, index=IndexConfig(dir=tmp_path / "index", use_gpu="no"))
    uri = f"{store.uri}/images.lance"
    indexed = CacheTable.open(store).version
    manifest = indexing.build(
        CacheTable.open(store),
        settings.index,
        indexing.BuildOptions(progress=False, index_key="Flat"),
    )
    assert manifest["table"]["version"] == indexed
    for i in range(3):
        append_rows(store, 100, DIM, seed=10 + i, start=600 + 100 * i)
    latest = CacheTable.open(store).version
    assert len(versions(uri)) == latest  # every version is still there

    # A long retention frees nothing.
    kept = collect(settings, retention_s=3600.0)
    assert kept.bytes_freed == 0 and len(versions(uri)) == latest

    report = collect(settings, retention_s=0.0)
    assert versions(uri) == [indexed, latest]  # the indexed version is tagged, so kept
    assert report.tables["images"].tagged == [indexed]
    assert report.tables["images"].versions_removed == latest - 2
    assert report.bytes_freed > 0
    assert report.bytes_freed == sum(t.bytes_freed for t in report.tables.values())
    # The index's version still reads, row for row.
    loaded = indexing.load_current(settings.index.dir, CacheTable.open(store, version=indexed))
    assert loaded.manifest.table.row_count == 600
    assert CacheTable.open(store, version=indexed).count() == 600
    # Appends only: nothing was rewritten, so the kept versions' files are all live.
    images = report.tables["images"]
    assert images.disk_bytes <= 1.2 * images.live_bytes + 64 * 1024  # + manifests

    # The index version is pruned (a newer one published): its tag goes, and so does the
    # table version at the next gc.
    newer = indexing.build(
        CacheTable.open(store),
        settings.index.model_copy(update={"keep_versions": 1}),
        indexing.BuildOptions(progress=False, index_key="Flat"),
    )
    assert indexing.list_versions(settings.index.dir) == [newer["version"]]
    again = collect(settings, retention_s=0.0)
    assert versions(uri) == [latest] and again.tables["images"].tagged == [latest]
    tags = lance.dataset(uri).tags.list()
    assert list(tags) == [f"{tag_prefix(settings.index.dir)}{newer['version']}"]


def test_store_gc_cli_reports_bytes_freed(tmp_path: Path, capsys) -> None:
    store = make_images_table(tmp_path / "db", 200, DIM, seed=0)
    append_rows(store, 200, DIM, seed=1, start=200)
    lance.dataset(f"{store.uri}/images.lance").optimize.compact_files()  # data twice now
    before = collect_store(store, retention_s=3600.0).tables["images"]
    assert before.disk_bytes > 1.5 * before.live_bytes
    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\nuri = "{store.uri}"\nretention_s = 0\n[index]\ndir = "{tmp_path / "ix"}"\n'
    )
    assert cli_main(["--config", str(config), "store", "gc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    images = out["tables"]["images"]
    latest = lance.dataset(f"{store.uri}/images.lance").version
    assert out["bytes_freed"] > 0 and images["versions_kept"] == [latest]
    assert images["versions_removed"] == latest - 1
    assert images["disk_bytes"] <= 1.2 * images["live_bytes"] + 64 * 1024
    assert CacheTable.open(store).count() == 400


def test_a_version_an_index_build_is_reading_survives_a_gc_meanwhile(tmp_path: Path) -> None:
    store = make_images_table(tmp_path / "db", 200, DIM, seed=0)
    reading = CacheTable.open(store)
    append_rows(store, 200, DIM, seed=1, start=200)
    settings = Settings(store=store, index=IndexConfig(dir=tmp_path / "index", use_gpu="no"))
    uri = f"{store.uri}/images.lance"
    with pinned(reading):
        collect(settings, retention_s=0.0)
        assert reading.version in versions(uri)
        assert CacheTable.open(store, version=reading.version).count() == 200
    assert lance.dataset(uri).tags.list() == {}  # the pin is gone with the build
    collect(settings, retention_s=0.0)
    assert versions(uri) == [CacheTable.open(store).version]


def test_index_add_collects_the_versions_between_the_indexed_ones(tmp_path: Path, capsys) -> None:
    store = make_images_table(tmp_path / "db", 300, DIM, seed=0)
    uri = f"{store.uri}/images.lance"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\nuri = "{store.uri}"\n[index]\ndir = "{tmp_path / "ix"}"\nuse_gpu = "no"\n'
    )
    assert cli_main(["--config", str(config), "index", "build", "--json"]) == 0
    built = CacheTable.open(store).version
    for i in range(3):
        append_rows(store, 50, DIM, seed=i + 1, start=300 + 50 * i)
    assert cli_main(["--config", str(config), "index", "add", "--json"]) == 0
    latest = CacheTable.open(store).version
    # Both index versions' table versions are kept (tagged); the appends between them went.
    assert versions(uri) == [built, latest] and latest - built == 3
    assert "gc (retention 0 s)" in capsys.readouterr().err
