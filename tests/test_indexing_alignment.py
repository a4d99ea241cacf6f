"""Loading refuses an index built from another table (clip-retrieval serves it silently)."""

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
N = 1_500


@pytest.fixture()
def built(tmp_path: Path):
    store = make_images_table(tmp_path / "db", N, DIM, seed=0)
    cfg = IndexConfig(dir=tmp_path / "index", use_gpu="no")
    manifest = indexing.build(CacheTable.open(store), cfg, indexing.BuildOptions(progress=False))
    return store, cfg, manifest


def test_the_table_it_was_built_from_loads(built) -> None:
    store, cfg, manifest = built
    loaded = indexing.load_current(cfg.dir, CacheTable.open(store), use_gpu="no")
    assert loaded.version == manifest["version"] and loaded.ntotal == N


def test_a_newer_table_version_is_refused(built) -> None:
    store, cfg, _ = built
    append_rows(store, 10, DIM, seed=9, start=N)
    with pytest.raises(IndexMismatchError, match="table version"):
        indexing.load_current(cfg.dir, CacheTable.open(store), use_gpu="no")
    # Pinned at the version the index was built from, the same table still loads.
    old = CacheTable.open(store, version=built[2]["table"]["version"])
    assert indexing.load_current(cfg.dir, old, use_gpu="no").ntotal == N


def test_a_table_with_another_row_count_is_refused(built, tmp_path: Path) -> None:
    store, cfg, manifest = built
    # Another table at the same version number but with fewer rows (e.g. a wrong --table).
    other = make_images_table(tmp_path / "db", N - 1, DIM, seed=0, name="smaller")
    table = CacheTable.open(other)
    assert table.version == manifest["table"]["version"]
    with pytest.raises(IndexMismatchError, match="rows"):
        indexing.load_current(cfg.dir, table, use_gpu="no")


def test_a_table_with_other_ids_is_refused(built, tmp_path: Path) -> None:
    store, cfg, manifest = built
    # Same version, same row count, same vectors -- but the rows are in another order.
    src = lancedb.connect(store.uri).open_table(store.table).to_arrow()
    db = lancedb.connect(str(tmp_path / "db2"))
    shuffled = src.take(np.random.default_rng(0).permutation(N))
    db.create_table("images", schema=src.schema).add(shuffled)
    table = CacheTable.open(store.model_copy(update={"uri": str(tmp_path / "db2")}))
    assert table.version == manifest["table"]["version"] and table.count() == N
    with pytest.raises(IndexMismatchError, match="other ids"):
        indexing.load_current(cfg.dir, table, use_gpu="no")


def test_a_corrupted_id_file_is_refused(built) -> None:
    store, cfg, manifest = built
    path = cfg.dir / "versions" / manifest["version"] / "ids.npy"
    ids = np.load(path)
    ids[[0, 1]] = ids[[1, 0]]
    np.save(path, ids)
    with pytest.raises(IndexMismatchError, match="ids.npy"):
        indexing.load_current(cfg.dir, CacheTable.open(store), use_gpu="no")
