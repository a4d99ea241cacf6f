"""Incremental add: rows appended to the table join a trained index as a new version."""

from __future__ import annotations

from pathlib import Path

import faiss
import lancedb
import numpy as np
import pytest
from tables import append_rows, make_images_table

import indexing
from cachebind.config import IndexConfig
from cachebind.errors import IndexMismatchError
from cachebind.store import CacheTable
from indexing.steps.select import FLAT_MAX_ROWS, outgrown, select_index

faiss.omp_set_num_threads(1)

DIM = 32
KEY = "IVF32,PQ16x4fs,RFlat"


def test_appended_rows_are_added_without_retraining(tmp_path: Path) -> None:
    store = make_images_table(tmp_path / "db", 4_000, DIM, seed=0)
    cfg = IndexConfig(dir=tmp_path / "index", use_gpu="no", recall_target=0.9)
    first = indexing.build(
        CacheTable.open(store), cfg, indexing.BuildOptions(progress=False, index_key=KEY)
    )
    before = indexing.load_current(cfg.dir, CacheTable.open(store), use_gpu="no")
    centroids = faiss.extract_index_ivf(before.index).quantizer.reconstruct_n(0, 32)

    append_rows(store, 1_000, DIM, seed=5, start=4_000)
    table = CacheTable.open(store)
    second = indexing.add(table, cfg, indexing.BuildOptions(progress=False))

    assert second["version"] == "v000002" and second["parent_version"] == first["version"]
    assert second["added_rows"] == 1_000 and second["ntotal"] == 5_000
    assert second["table"]["version"] == table.version
    assert second["index_key"] == KEY
    assert second["recall"]["10"] >= 0.9  # re-measured on the grown index
    assert indexing.current_version(cfg.dir) == "v000002"

    after = indexing.load_current(cfg.dir, table, use_gpu="no")
    # Same trained centroids: nothing was retrained.
    np.testing.assert_array_equal(
        faiss.extract_index_ivf(after.index).quantizer.reconstruct_n(0, 32), centroids
    )
    np.testing.assert_array_equal(after.ids, table.ids())
    new_ids = table.ids()[4_000:4_005]
    _, found = after.search(table.vectors(new_ids.tolist()), 1)
    np.testing.assert_array_equal(found[:, 0], new_ids)
    np.testing.assert_array_equal(after.vectors(new_ids), table.vectors(new_ids.tolist()))


def test_a_rewritten_table_needs_a_rebuild(tmp_path: Path) -> None:
    store = make_images_table(tmp_path / "db", 1_000, DIM, seed=0)
    cfg = IndexConfig(dir=tmp_path / "index", use_gpu="no")
    indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    first_id = int(CacheTable.open(store).ids()[0])
    lancedb.connect(store.uri).open_table(store.table).delete(f"id = {first_id}")
    append_rows(store, 10, DIM, seed=5, start=1_000)
    with pytest.raises(IndexMismatchError, match="rebuild"):
        indexing.add(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    assert indexing.list_versions(cfg.dir) == ["v000001"]


def test_a_flat_index_outgrown_by_the_table_is_rebuilt_as_ivf(tmp_path: Path) -> None:
    store = make_images_table(tmp_path / "db", FLAT_MAX_ROWS - 2_000, DIM, seed=0)
    cfg = IndexConfig(dir=tmp_path / "index", use_gpu="no", recall_target=0.9)
    first = indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    assert first["index_key"] == "Flat"

    append_rows(store, 4_000, DIM, seed=5, start=FLAT_MAX_ROWS - 2_000)
    table = CacheTable.open(store)
    second = indexing.add(table, cfg, indexing.BuildOptions(progress=False))

    assert second["update"]["mode"] == "rebuilt"
    assert "Flat" in second["update"]["reason"] and "IVF" in second["update"]["reason"]
    assert second["index_key"].startswith("IVF") and second["ntotal"] == FLAT_MAX_ROWS + 2_000
    assert second["parent_version"] == first["version"] and second["added_rows"] == 4_000
    assert second["recall"]["10"] >= 0.9
    loaded = indexing.load_current(cfg.dir, table, use_gpu="no")
    np.testing.assert_array_equal(loaded.ids, table.ids())


def test_with_rebuild_off_an_outgrown_index_is_added_to_and_says_so(tmp_path: Path) -> None:
    store = make_images_table(tmp_path / "db", 3_000, DIM, seed=0)
    cfg = IndexConfig(dir=tmp_path / "index", use_gpu="no", rebuild_when_outgrown=False)
    indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    # A budget the grown table's float32 vectors no longer fit asks for a quantized key.
    append_rows(store, 1_000, DIM, seed=5, start=3_000)
    tight = cfg.model_copy(update={"memory_budget_gb": 3_500 * DIM * 4 / 2**30})
    second = indexing.add(CacheTable.open(store), tight, indexing.BuildOptions(progress=False))

    assert second["index_key"] == "Flat" and second["update"]["mode"] == "added"
    assert "rebuild_when_outgrown is off" in second["update"]["reason"]


def test_an_index_that_still_suits_the_table_is_added_to() -> None:
    fresh = select_index(60_000, 1024, 16.0)
    assert outgrown(select_index(55_000, 1024, 16.0).to_dict(), fresh, gpu_seen=False) is None


@pytest.mark.parametrize(
    ("old_rows", "new_rows", "why"),
    [
        (10_000, 60_000, "no longer fits"),  # Flat -> IVF
        (60_000, 2_000_000, "lists are too long"),  # IVF256 -> IVF4096: 16x the rows
    ],
)
def test_growth_that_changes_the_selection_calls_for_a_rebuild(
    old_rows: int, new_rows: int, why: str
) -> None:
    parent = select_index(old_rows, 1024, 64.0).to_dict()
    assert why in str(outgrown(parent, select_index(new_rows, 1024, 64.0), gpu_seen=False))


def test_a_forced_key_or_a_gpu_index_seen_from_a_cpu_machine_is_kept() -> None:
    fresh = select_index(5_000_000, 1024, 64.0)
    forced = {"key": "IVF64,Flat", "reason": "forced by the caller", "device": "cpu"}
    gpu_flat = {"key": "Flat", "reason": "fits the GPU", "device": "gpu"}
    assert outgrown(forced, fresh, gpu_seen=False) is None
    assert outgrown(gpu_flat, fresh, gpu_seen=False) is None
    assert outgrown(gpu_flat, fresh, gpu_seen=True) is not None
