"""The table handle: one pinned version, rows and exact vectors looked up by id."""

from __future__ import annotations

import numpy as np
import pytest
from builders import append_rows, build_demo_cache

from cachebind.store import CacheTable, row_id


def test_lookups_keep_the_order_asked_and_stay_on_the_pinned_version(tmp_path):
    cache = build_demo_cache(tmp_path, rows=300, dim=16)
    table = CacheTable.open(cache.store)
    append_rows(cache, 20)  # a later version: the handle stays on the version it opened
    assert table.count() == 300
    ids = [row_id(f"sample-{i:06d}") for i in (250, 3, 77, 310, 3)]  # 310 is only in v2
    rows = table.rows(ids, ["id", "key"])
    assert rows.column("key").to_pylist() == [
        "sample-000250",
        "sample-000003",
        "sample-000077",
        "sample-000003",
    ]
    assert CacheTable.open(cache.store).rows(ids[3:4], ["key"]).column("key").to_pylist() == [
        "sample-000310"
    ]
    with pytest.raises(KeyError, match=str(ids[3])):
        table.vectors(ids)
    assert table.rows([], ["id"]).num_rows == 0
    assert table.vectors([]).shape == (0, 16)


def test_vectors_are_the_stored_ones_exactly(tmp_path):
    cache = build_demo_cache(tmp_path, rows=50, dim=16)
    table = CacheTable.open(cache.store)
    all_ids, all_vectors = next(table.iter_vectors())
    pick = [7, 0, 42, 7]
    np.testing.assert_array_equal(table.vectors(all_ids[pick]), all_vectors[pick])
    assert table.vectors(all_ids[pick]).dtype == np.float32
