"""CacheWriter: every id lands once, whatever is re-sent; another encoder's table is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cachebind.config import StoreConfig
from cachebind.store import (
    ERRORS_SCHEMA,
    CacheTable,
    CacheWriter,
    EncoderMismatchError,
    TableMismatchError,
    images_schema,
    row_id,
)
from cachebind.store.writer import IdSet

TINY = {"encoder": {"preset": "tiny", "weights": "random-init:seed=0"}, "preprocess_version": "1"}


def rows(keys: list[str], dim: int = 8, shard: str = "s0") -> pa.Table:
    n = len(keys)
    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float16)
    return pa.table(
        {
            "id": pa.array([row_id(k) for k in keys], pa.int64()),
            "key": keys,
            "caption": [f"c {k}" for k in keys],
            "url": [None] * n,
            "width": pa.array([10] * n, pa.int32()),
            "height": pa.array([10] * n, pa.int32()),
            "shard": [shard] * n,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
            "thumbnail": pa.array([b"jpeg"] * n, pa.binary()),
        }
    )


def errors(keys: list[str], shard: str = "s0") -> pa.Table:
    n = len(keys)
    return pa.table(
        {
            "id": pa.array([row_id(k) for k in keys], pa.int64()),
            "key": keys,
            "shard": [shard] * n,
            "stage": ["decode"] * n,
            "reason": ["truncated"] * n,
            "detail": [""] * n,
        },
        schema=ERRORS_SCHEMA,
    )


@pytest.fixture
def store(tmp_path: Path) -> StoreConfig:
    return StoreConfig(uri=str(tmp_path / "db"))


def test_each_id_is_written_once_across_batches_and_reopens(store: StoreConfig) -> None:
    schema = images_schema(dim=8, metadata=TINY)
    writer = CacheWriter(store, schema)
    first = writer.write_rows(rows(["a", "b", "b"]))
    assert (first.written, first.skipped) == (2, 1)  # a key repeated in one batch
    assert writer.write_rows(rows(["b", "c"])).written == 1
    reopened = CacheWriter(store, schema)  # a new run: ids come from the table
    assert reopened.write_rows(rows(["a", "c", "d"])).written == 1
    table = CacheTable.open(store)
    assert sorted(table.table.to_arrow()["key"].to_pylist()) == ["a", "b", "c", "d"]
    assert len(set(table.ids().tolist())) == table.count() == 4
    assert table.metadata["encoder"] == TINY["encoder"]


def test_errors_and_progress_tables(store: StoreConfig) -> None:
    writer = CacheWriter(store, images_schema(dim=8, metadata=TINY))
    assert writer.write_errors(errors(["x", "y"], shard="s1")).written == 2
    assert writer.write_errors(errors(["x"], shard="s1")).skipped == 1
    writer.write_rows(rows(["a"], shard="s1"))
    writer.write_rows(rows(["z"], shard="s2"))
    assert writer.committed_by_shard({"s1"}) == {"s1": {row_id(k) for k in "axy"}}
    writer.finish_partitions([{"partition": "s1", "fingerprint": "f1", "rows": 1, "errors": 2}])
    assert CacheWriter(store, images_schema(dim=8, metadata=TINY)).finished_partitions() == {
        "s1": "f1"
    }


def test_a_checkpoint_moved_to_another_path_with_the_same_sha256_may_append(
    store: StoreConfig,
) -> None:
    def checkpoint(path: str) -> dict:
        encoder = {"preset": "huge", "checkpoint": path, "weights": "sha256:ab", "sha256": "ab"}
        return {"encoder": encoder, "preprocess_version": "1"}

    CacheWriter(store, images_schema(dim=8, metadata=checkpoint("/a/w.pth"))).write_rows(
        rows(["a"])
    )
    CacheWriter(store, images_schema(dim=8, metadata=checkpoint("/b/w.pth"))).write_rows(
        rows(["b"])
    )
    other = {**checkpoint("/a/w.pth"), "encoder": {"preset": "huge", "weights": "sha256:cd"}}
    with pytest.raises(EncoderMismatchError, match="sha256:cd"):
        CacheWriter(store, images_schema(dim=8, metadata=other))


def test_another_encoder_identity_is_refused(store: StoreConfig) -> None:
    CacheWriter(store, images_schema(dim=8, metadata=TINY)).write_rows(rows(["a"]))
    other = {**TINY, "encoder": {"preset": "tiny", "weights": "random-init:seed=1"}}
    with pytest.raises(EncoderMismatchError, match="random-init:seed=1"):
        CacheWriter(store, images_schema(dim=8, metadata=other))
    newer = {**TINY, "preprocess_version": "2"}
    with pytest.raises(EncoderMismatchError, match="preprocess_version"):
        CacheWriter(store, images_schema(dim=8, metadata=newer))
    with pytest.raises(TableMismatchError, match="vector"):
        CacheWriter(store, images_schema(dim=8, dtype="float32", metadata=TINY))
    with pytest.raises(TableMismatchError, match="thumbnail"):
        CacheWriter(store, images_schema(dim=8, thumbnail=False, metadata=TINY))
    # Other metadata (the source, the time) may change between runs.
    CacheWriter(store, images_schema(dim=8, metadata={**TINY, "source": "elsewhere"}))


def test_id_set_membership_survives_folding() -> None:
    ids = IdSet(np.array([5, 1, 3]), fold_at=4)
    ids.add([7, 9])
    assert ids.contains(np.array([1, 2, 7, 9, 10])).tolist() == [True, False, True, True, False]
    ids.add([11, 13])  # folds the recent additions into the sorted array
    assert len(ids) == 7
    assert ids.contains(np.array([13, 3, 4])).tolist() == [True, True, False]
    assert IdSet().contains(np.array([1])).tolist() == [False]
