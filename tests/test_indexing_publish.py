"""Publishing: versions, the atomic CURRENT pointer, crash safety and pruning."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from tables import make_images_table

import indexing
from cachebind.config import IndexConfig, StoreConfig
from cachebind.published.layout import version_number, versions_dir
from cachebind.published.manifest import read_manifest
from cachebind.store import CacheTable
from indexing.steps.build import build_index
from indexing.versions.publishing import new_staging_dir

faiss.omp_set_num_threads(1)  # 2 shared cores: spinning OpenMP threads only slow tests down

DIM = 32


@pytest.fixture()
def store(tmp_path: Path) -> StoreConfig:
    return make_images_table(tmp_path / "db", 2_000, DIM, seed=0)


def config(tmp_path: Path, **kw) -> IndexConfig:
    return IndexConfig(dir=tmp_path / "index", use_gpu="no", **kw)


def versions_on_disk(index_dir: Path) -> list[str]:
    root = index_dir / "versions"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_publish_creates_a_version_and_points_current_at_it(tmp_path: Path, store) -> None:
    cfg = config(tmp_path)
    assert indexing.current_version(cfg.dir) is None
    m1 = indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    assert indexing.current_version(cfg.dir) == m1["version"] == "v000001"
    folder = cfg.dir / "versions" / "v000001"
    assert sorted(p.name for p in folder.iterdir()) == ["ids.npy", "index.faiss", "manifest.json"]
    m2 = indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    assert m2["version"] == "v000002"
    assert indexing.current_version(cfg.dir) == "v000002"
    assert indexing.list_versions(cfg.dir) == ["v000001", "v000002"]
    assert (cfg.dir / "CURRENT").read_text().strip() == "v000002"
    assert not list(cfg.dir.glob("CURRENT.tmp*"))  # the pointer was replaced, not left behind
    assert not any((cfg.dir / "staging").iterdir())


@pytest.mark.parametrize("stage", ["trained", "added", "tuned", "index_written"])
def test_a_crashed_build_changes_nothing(tmp_path: Path, store, stage: str) -> None:
    cfg = config(tmp_path)
    first = indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    before = versions_on_disk(cfg.dir)

    def crash(at: str) -> None:
        if at == stage:
            raise RuntimeError(f"worker died after {at}")

    table = CacheTable.open(store)
    with pytest.raises(RuntimeError, match="worker died"):
        staged = build_index(
            table,
            cfg,
            indexing.BuildOptions(progress=False, index_key="IVF8,PQ16x4fs,RFlat", on_stage=crash),
        )
        indexing.publish(cfg.dir, staged, cfg.keep_versions)
    assert indexing.current_version(cfg.dir) == first["version"]
    assert versions_on_disk(cfg.dir) == before
    assert not any((cfg.dir / "staging").iterdir())  # no half-written build left behind
    # And what CURRENT points at still loads and serves.
    loaded = indexing.load_current(cfg.dir, table, use_gpu="no")
    assert loaded.version == first["version"]


def test_an_incomplete_staging_directory_is_never_published(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    staged = new_staging_dir(cfg.dir)
    (staged / "index.faiss").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="incomplete build"):
        indexing.publish(cfg.dir, staged, 3)
    assert indexing.current_version(cfg.dir) is None
    assert indexing.list_versions(cfg.dir) == []


def test_a_manifest_that_is_not_a_json_object_is_refused_naming_its_file(tmp_path: Path) -> None:
    version_dir = versions_dir(tmp_path) / "v000001"
    version_dir.mkdir(parents=True)
    (version_dir / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"v000001.manifest\.json holds a JSON list"):
        read_manifest(tmp_path, "v000001")


def test_versions_are_listed_in_number_order_and_other_names_are_not_versions(
    tmp_path: Path,
) -> None:
    for name in ("v000010", "v000002", "v2", "staging-v000003", "v000001"):
        (versions_dir(tmp_path) / name).mkdir(parents=True)
    assert indexing.list_versions(tmp_path) == ["v000001", "v000002", "v000010"]
    assert version_number("v000010") == 10
    with pytest.raises(ValueError, match="'v2' is not a version name"):
        version_number("v2")


def test_old_versions_are_pruned_by_count_but_never_the_current_one(tmp_path: Path, store) -> None:
    cfg = config(tmp_path, keep_versions=2)
    for _ in range(4):
        indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    assert indexing.list_versions(cfg.dir) == ["v000003", "v000004"]
    # Roll back to the older one, then publish twice more: the rolled-back current survives.
    indexing.set_current(cfg.dir, "v000003")
    staged = build_index(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    indexing.publish(cfg.dir, staged, keep_versions=1)
    assert indexing.list_versions(cfg.dir) == ["v000005"]
    indexing.set_current(cfg.dir, "v000005")
    assert indexing.prune(cfg.dir, keep_versions=1) == []


def test_pruning_keeps_a_current_that_is_older_than_the_kept_window(tmp_path: Path, store) -> None:
    cfg = config(tmp_path, keep_versions=3)
    for _ in range(3):
        indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    indexing.set_current(cfg.dir, "v000001")
    indexing.prune(cfg.dir, keep_versions=1)
    assert indexing.list_versions(cfg.dir) == ["v000001", "v000003"]
    assert indexing.current_version(cfg.dir) == "v000001"


def test_version_manifest_is_json_with_its_own_name(tmp_path: Path, store) -> None:
    cfg = config(tmp_path)
    m = indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    on_disk = json.loads((cfg.dir / "versions" / m["version"] / "manifest.json").read_text())
    assert on_disk["version"] == m["version"]
    ids = np.load(cfg.dir / "versions" / m["version"] / "ids.npy")
    assert ids.dtype == np.int64 and len(ids) == 2_000


def test_a_killed_build_process_leaves_current_alone(tmp_path: Path, store) -> None:
    """A hard crash (the process dies mid-write, no cleanup runs) publishes nothing."""
    import subprocess
    import sys
    import textwrap

    cfg = config(tmp_path)
    first = indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        import indexing
        from cachebind.config import IndexConfig, StoreConfig
        from cachebind.store import CacheTable
        from indexing.steps.build import build_index
        store = StoreConfig(uri={store.uri!r}, table={store.table!r})
        cfg = IndexConfig(dir=Path({str(cfg.dir)!r}), use_gpu="no")
        def die(stage):
            if stage == "index_written":
                os._exit(9)
        options = indexing.BuildOptions(progress=False, on_stage=die)
        staged = build_index(CacheTable.open(store), cfg, options)
        indexing.publish(cfg.dir, staged, 3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert indexing.current_version(cfg.dir) == first["version"]
    assert indexing.list_versions(cfg.dir) == [first["version"]]
    # The dead build's files stay in staging/, invisible to readers, until pruned.
    assert len(list((cfg.dir / "staging").iterdir())) == 1


def test_a_version_records_its_files_checksums_and_verify_finds_a_flipped_byte(
    tmp_path: Path, store, capsys: pytest.CaptureFixture[str]
) -> None:
    from cachebind.cli import main as cli_main

    cfg = config(tmp_path)
    m = indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    folder = cfg.dir / "versions" / m["version"]
    assert set(m["files"]) == {"index.faiss", "ids.npy"}
    assert m["files"]["ids.npy"]["bytes"] == (folder / "ids.npy").stat().st_size
    assert indexing.verify_version(cfg.dir, m["version"]) == []
    args = ["index", "verify", "--index-dir", str(cfg.dir)]
    assert cli_main(args) == 0 and "every file matches" in capsys.readouterr().out

    # A flipped byte keeps the size (loading still works) but not the checksum.
    data = bytearray((folder / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "index.faiss").write_bytes(bytes(data))
    problems = indexing.verify_version(cfg.dir, m["version"])
    assert problems == [f"{m['version']}/index.faiss: sha256 differs from the manifest's (corrupt)"]
    assert cli_main(args) == 1 and "index.faiss" in capsys.readouterr().err
    (folder / "ids.npy").unlink()
    assert f"{m['version']}/ids.npy: missing" in indexing.verify_version(cfg.dir, m["version"])
