"""On-disk merge of a sharded IVF build: the driver streams the shards' inverted lists into one
memory-mapped ``index.ivfdata`` that belongs to the version, and servers map it read-only."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from ray_local import use_local_ray
from tables import append_rows, make_images_table

import indexing
from cachebind.config import IndexConfig, StoreConfig
from cachebind.errors import IndexMismatchError
from cachebind.published.gpu import gpu_refusal, to_gpu
from cachebind.published.manifest import read_manifest
from cachebind.store import CacheTable
from indexing.mechanics.ondisk import IVFDATA_FILE, plan_merge, unsupported_reason, write_shard
from indexing.mechanics.params import apply_search_params
from indexing.steps.build import build_index
from indexing.steps.select import select_index

faiss.omp_set_num_threads(1)

DIM = 32
N = 4_000
# The shape of autofaiss's key for 100M rows (OPQ rotation, HNSW coarse quantizer, PQ codes).
KEY = "OPQ16_32,IVF16_HNSW32,PQ16x4"


@pytest.fixture(scope="module")
def local_ray():
    use_local_ray(num_cpus=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> StoreConfig:
    return make_images_table(tmp_path_factory.mktemp("ondisk") / "db", N, DIM, seed=0)


def config(index_dir: Path, **kw) -> IndexConfig:
    return IndexConfig(dir=index_dir, use_gpu="no", **kw)


def build(store: StoreConfig, index_dir: Path, shards: int = 1, **kw) -> dict:
    return indexing.build(
        CacheTable.open(store),
        config(index_dir, **kw),
        indexing.BuildOptions(progress=False, index_key=KEY, shards=shards),
    )


@pytest.fixture(scope="module")
def builds(store, tmp_path_factory: pytest.TempPathFactory, local_ray) -> dict[str, Path]:
    """The same key over the same table: one process, shards merged in memory, on disk."""
    root = tmp_path_factory.mktemp("builds")
    build(store, root / "single")
    build(store, root / "memory", shards=3, merge_on_disk="no")
    build(store, root / "disk", shards=3, merge_on_disk="yes")
    return {name: root / name for name in ("single", "memory", "disk")}


def search_all(index_dir: Path, table: CacheTable, params: dict) -> tuple[np.ndarray, np.ndarray]:
    loaded = indexing.load_current(index_dir, table, use_gpu="no")
    apply_search_params(loaded.index, params)
    return loaded.search(table.vectors(table.ids()[::37].tolist()), 20)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_on_disk_merge_gives_the_single_builds_results(builds, store) -> None:
    table = CacheTable.open(store)
    manifests = {name: read_manifest(d, "v000001") for name, d in builds.items()}
    disk = manifests["disk"]
    # (written from the driver's own index object: it was tuned with its lists on disk)
    assert disk.storage["invlists"] == "ondisk" and disk.storage["ivfdata"] == IVFDATA_FILE
    assert manifests["memory"].storage["invlists"] == "memory"
    assert set(disk.files or {}) == {"index.faiss", "ids.npy", IVFDATA_FILE}  # all checksummed
    assert indexing.verify_version(builds["disk"], "v000001") == []
    assert disk.table == manifests["single"].table  # same ids in the same order
    # Tuning saw the same recall at every step in all three (timings may differ).
    recalls = {name: [t["recall"] for t in m.tuning_trials] for name, m in manifests.items()}
    assert recalls["disk"] == recalls["memory"] == recalls["single"]
    params = manifests["single"].search_params
    expected_scores, expected_ids = search_all(builds["single"], table, params)
    for name in ("memory", "disk"):
        scores, ids = search_all(builds[name], table, params)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-6)


def test_a_loaded_on_disk_version_maps_its_codes_instead_of_holding_them(builds, store) -> None:
    folder = builds["disk"] / "versions" / "v000001"
    loaded = indexing.load_current(builds["disk"], CacheTable.open(store), use_gpu="no")
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    assert lists.read_only  # mapped PROT_READ: shared by servers, never written
    assert Path(lists.filename) == folder / IVFDATA_FILE
    ivfdata = (folder / IVFDATA_FILE).stat().st_size
    assert ivfdata == lists.totsize >= N * (faiss.extract_index_ivf(loaded.index).code_size + 8)
    # What is read into RAM (quantizer, codebooks, list offsets) is a fraction of the codes,
    # and so is the index serialised (no codes inside).
    assert (folder / "index.faiss").stat().st_size < ivfdata / 2
    assert len(faiss.serialize_index(loaded.index)) < ivfdata / 2
    manifest = loaded.manifest
    assert manifest.memory_bytes < ivfdata
    assert manifest.storage["ivfdata_bytes"] == ivfdata
    # The staging folder is gone, and so are the shard files.
    assert not any((builds["disk"] / "staging").iterdir())
    # The exact vectors handed to the blend still come from the table, not from the PQ codes.
    ids = loaded.ids[[0, 17, N - 1]]
    np.testing.assert_array_equal(loaded.vectors(ids), CacheTable.open(store).vectors(ids.tolist()))


def test_the_version_folder_is_self_contained_and_relocatable(builds, store, tmp_path) -> None:
    table = CacheTable.open(store)
    params = read_manifest(builds["disk"], "v000001").search_params
    expected = search_all(builds["disk"], table, params)
    index_file = builds["disk"] / "versions" / "v000001" / "index.faiss"
    assert b"staging" not in index_file.read_bytes()  # the ivfdata is named relative to it
    moved = tmp_path / "elsewhere" / "index"
    shutil.copytree(builds["disk"], moved)
    found = search_all(moved, table, params)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_array_equal(found[0], expected[0])


def test_a_truncated_or_missing_ivfdata_is_refused(builds, store, tmp_path) -> None:
    index_dir = tmp_path / "index"
    shutil.copytree(builds["disk"], index_dir)
    table = CacheTable.open(store)
    data = index_dir / "versions" / "v000001" / IVFDATA_FILE
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 16)
    with pytest.raises(IndexMismatchError, match="corrupt"):
        indexing.load_current(index_dir, table, use_gpu="no")
    data.unlink()
    with pytest.raises(IndexMismatchError, match="missing"):
        indexing.load_current(index_dir, table, use_gpu="no")


@pytest.mark.parametrize("stage", ["shards_written", "added", "index_written"])
def test_a_crash_during_the_on_disk_merge_leaves_current_alone(
    builds, store, tmp_path, stage: str
) -> None:
    cfg = config(tmp_path / "index", merge_on_disk="yes", shard_dir=tmp_path / "shared")
    shutil.copytree(builds["disk"], cfg.dir)
    before = sorted(p.name for p in (cfg.dir / "versions").iterdir())

    def crash(at: str) -> None:
        if at == stage:
            raise RuntimeError(f"driver died after {at}")

    with pytest.raises(RuntimeError, match="driver died"):
        staged = build_index(
            CacheTable.open(store),
            cfg,
            indexing.BuildOptions(index_key=KEY, shards=2, on_stage=crash, progress=False),
        )
        indexing.publish(cfg.dir, staged, cfg.keep_versions)
    assert indexing.current_version(cfg.dir) == "v000001"
    assert sorted(p.name for p in (cfg.dir / "versions").iterdir()) == before
    assert not any((cfg.dir / "staging").iterdir())  # no half-merged ivfdata left behind
    assert not any((tmp_path / "shared").iterdir())  # nor shard files on the shared path
    indexing.load_current(cfg.dir, CacheTable.open(store), use_gpu="no")


def test_a_shard_file_cut_short_fails_the_merge_cleanly(store, tmp_path, local_ray) -> None:
    """A shard file that does not hold what its task wrote (a node lost it, a network file
    system hiccup) is refused before the merge maps it, instead of a SIGBUS mid-merge."""
    shared = tmp_path / "shared"
    cfg = config(tmp_path / "index", merge_on_disk="yes", shard_dir=shared)

    def cut(at: str) -> None:
        if at == "shards_written":
            victim = sorted(shared.glob("*/shard-*"))[-1]
            with open(victim, "r+b") as f:
                f.truncate(victim.stat().st_size // 2)

    with pytest.raises(RuntimeError, match="its task wrote"):
        build_index(
            CacheTable.open(store),
            cfg,
            indexing.BuildOptions(index_key=KEY, shards=2, on_stage=cut, progress=False),
        )
    assert indexing.current_version(cfg.dir) is None
    assert not any((cfg.dir / "staging").iterdir()) and not any(shared.iterdir())


def test_shards_written_to_a_shared_directory_merge_the_same(builds, store, tmp_path) -> None:
    shared = tmp_path / "shared"
    manifest = build(store, tmp_path / "index", shards=3, merge_on_disk="yes", shard_dir=shared)
    assert manifest["storage"]["invlists"] == "ondisk"
    assert not any(shared.iterdir())  # the build's shard files are removed after the merge
    table = CacheTable.open(store)
    params = manifest["search_params"]
    np.testing.assert_array_equal(
        search_all(tmp_path / "index", table, params)[1],
        search_all(builds["disk"], table, params)[1],
    )


def test_old_versions_and_their_ivfdata_are_pruned(builds, store, tmp_path) -> None:
    index_dir = tmp_path / "index"
    shutil.copytree(builds["disk"], index_dir)
    old = index_dir / "versions" / "v000001" / IVFDATA_FILE
    assert old.is_file()
    build(store, index_dir, shards=2, merge_on_disk="yes", keep_versions=1)
    assert indexing.list_versions(index_dir) == ["v000002"]
    assert not old.exists()
    assert (index_dir / "versions" / "v000002" / IVFDATA_FILE).is_file()


def test_adding_rows_to_an_on_disk_version_copies_on_write(tmp_path, local_ray) -> None:
    """The new version gets its own ivfdata (parent + new lists); the published parent's files
    are never written, and the result equals adding the rows to an in-memory version."""
    results = {}
    for mode in ("no", "yes"):
        store = make_images_table(tmp_path / mode / "db", 3_000, DIM, seed=3)
        index_dir = tmp_path / mode / "index"
        build(store, index_dir, shards=2, merge_on_disk=mode)
        parent = index_dir / "versions" / "v000001"
        before = {p.name: sha256(p) for p in parent.iterdir()}
        append_rows(store, 600, DIM, seed=7, start=3_000)
        table = CacheTable.open(store)
        grown = indexing.add(table, config(index_dir), indexing.BuildOptions(progress=False))
        assert grown["parent_version"] == "v000001" and grown["ntotal"] == 3_600
        assert {p.name: sha256(p) for p in parent.iterdir()} == before
        assert not any((index_dir / "staging").iterdir())
        results[mode] = (grown, table, index_dir)
    grown, table, index_dir = results["yes"]
    assert grown["storage"]["invlists"] == "ondisk"
    assert (index_dir / "versions" / "v000002" / IVFDATA_FILE).is_file()
    params = results["no"][0]["search_params"]
    on_disk = search_all(index_dir, table, params)
    in_memory = search_all(results["no"][2], results["no"][1], params)
    np.testing.assert_array_equal(on_disk[1], in_memory[1])
    np.testing.assert_allclose(on_disk[0], in_memory[0], rtol=0, atol=1e-6)
    # New rows are found by their own vectors.
    loaded = indexing.load_current(index_dir, table, use_gpu="no")
    apply_search_params(loaded.index, {"nprobe": 16})
    new_ids = table.ids()[3_000:3_005]
    _, found = loaded.search(table.vectors(new_ids.tolist()), 1)
    np.testing.assert_array_equal(found[:, 0], new_ids)


def test_the_gpu_path_refuses_an_on_disk_index_and_keeps_it_on_the_cpu(builds, store) -> None:
    table = CacheTable.open(store)
    on_disk = indexing.load_current(builds["disk"], table, use_gpu="no")
    in_memory = indexing.load_current(builds["memory"], table, use_gpu="no")
    assert "on disk" in gpu_refusal(on_disk.index)
    assert gpu_refusal(in_memory.index) is None
    assert to_gpu(on_disk.index, KEY) is None


def test_faiss_progress_lines_stay_off_stdout(tmp_path, capfd) -> None:
    """The Ray job and ``--json`` print the manifest on stdout: FAISS's "resizing <file>" line,
    printed while it sizes an ivfdata, goes to stderr."""
    x = np.random.default_rng(0).standard_normal((500, DIM)).astype(np.float32)
    index = faiss.index_factory(DIM, "IVF4,SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    shard = write_shard(index, tmp_path / "shard.ivfdata")
    out, err = capfd.readouterr()
    assert "resizing" not in out and "resizing" in err
    assert shard.nbytes == (tmp_path / "shard.ivfdata").stat().st_size == 500 * (DIM + 8)


def test_auto_merges_on_disk_when_the_in_memory_merge_would_not_fit() -> None:
    small = config(Path("unused"))
    plan = plan_merge(KEY, 4_000, DIM, small, shards=3)
    assert not plan.on_disk and "fits" in plan.reason
    tight = config(Path("unused"), merge_memory_gb=1e-4)
    plan = plan_merge(KEY, 4_000, DIM, tight, shards=3)
    assert plan.on_disk and "merge_memory_gb" in plan.reason
    # Nothing to merge in a single-process build.
    assert not plan_merge(KEY, 4_000, DIM, tight, shards=1).on_disk
    assert not plan_merge(KEY, 4_000, DIM, config(Path("u"), merge_on_disk="no"), 3).on_disk


def test_keys_without_on_disk_lists_merge_in_memory_or_fail_fast_when_forced() -> None:
    tight = config(Path("unused"), merge_memory_gb=1e-4)
    for key, why in [
        ("IVF16,PQ16x4fs,RFlat", "RFlat"),
        ("IVF16,PQ16x4fs", "fast-scan"),
        ("Flat", "no inverted lists"),
    ]:
        plan = plan_merge(key, 4_000, DIM, tight, shards=3)
        assert not plan.on_disk and why in plan.reason
        with pytest.raises(ValueError, match="cannot be merged on disk"):
            plan_merge(key, 4_000, DIM, config(Path("u"), merge_on_disk="yes"), shards=3)
    for key in (KEY, "IVF16,SQ8", "IVF16,Flat", "IVF16,PQ16x8"):
        assert unsupported_reason(faiss.index_factory(DIM, key)) is None


def test_a_100m_row_cache_gets_a_compressed_key_merged_on_disk() -> None:
    """With the default budgets a 100M x 1024 cache is feasible: the selection compresses the
    vectors (RFlat would be ~400 GiB of float32) and the sharded build merges them on disk."""
    defaults = IndexConfig()
    selection = select_index(100_000_000, 1024, defaults.memory_budget_gb)
    assert unsupported_reason(faiss.index_factory(1024, selection.key)) is None
    assert "RFlat" not in selection.key and "fs" not in selection.key
    plan = plan_merge(selection.key, 100_000_000, 1024, defaults, shards=64)
    assert plan.on_disk
    assert plan.index_bytes <= defaults.memory_budget_gb * 2**30  # what a server maps


def test_publish_refuses_an_on_disk_build_without_its_ivfdata(builds, tmp_path) -> None:
    staged = tmp_path / "index" / "staging" / "x"
    shutil.copytree(builds["disk"] / "versions" / "v000001", staged)
    (staged / IVFDATA_FILE).unlink()
    manifest = json.loads((staged / "manifest.json").read_text())
    assert manifest["storage"]["invlists"] == "ondisk"
    with pytest.raises(FileNotFoundError, match=IVFDATA_FILE):
        indexing.publish(tmp_path / "index", staged)
    assert indexing.current_version(tmp_path / "index") is None
