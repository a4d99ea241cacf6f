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

faiss.omp_set_num_threads(1)

DIM = 32
KEY = "IVF32,PQ16x4fs,RFlat"


def test_appended_rows_are_added_without_retraining(tmp_path: Path) -> None:
    store = make_images_table(tmp_path / "db", 4_000, DIM, seed=0)
    cfg = IndexConfig(dir=tmp_path / "index", use_gpu="no", recall_target=0.9)
    first = indexing.build_and_publish(store, cfg, progress=False, index_key=KEY)
    before = indexing.load_current(cfg.dir, CacheTable.open(store), use_gpu="no")
    centroids = faiss.extract_index_ivf(before.index).quantizer.reconstruct_n(0, 32)

    append_rows(store, 1_000, DIM, seed=5, start=4_000)
    table = CacheTable.open(store)
    second = indexing.add_rows(cfg.dir, table, cfg, progress=False)

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
    indexing.build_and_publish(store, cfg, progress=False)
    first_id = int(CacheTable.open(store).ids()[0])
    lancedb.connect(store.uri).open_table(store.table).delete(f"id = {first_id}")
    append_rows(store, 10, DIM, seed=5, start=1_000)
    with pytest.raises(IndexMismatchError, match="rebuild"):
        indexing.add_rows(cfg.dir, CacheTable.open(store), cfg, progress=False)
    assert indexing.list_versions(cfg.dir) == ["v000001"]
