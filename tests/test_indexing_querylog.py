"""The query log: a bounded, uniform, per-modality sample of query embeddings that survives a
restart, is written atomically, holds nothing but float32 embeddings, and never disturbs the
version directory beside it."""

from __future__ import annotations

import json
import logging
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cachebind.published.querylog import (
    QUERY_LOG_FILENAME,
    QueryLog,
    load_query_sets,
    query_log_path,
)
from indexing.versions import publishing

DIM = 16


def unit(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_sample_is_bounded_per_modality_and_counts_what_it_saw() -> None:
    qlog = QueryLog(capacity_per_modality=100, seed=1)
    for i in range(30):
        qlog.add("text", unit(50, i))
    qlog.add("audio", unit(7, 99))
    snap = qlog.snapshot()
    assert snap["text"].shape == (100, DIM) and snap["text"].dtype == np.float32
    assert snap["audio"].shape == (7, DIM)
    assert qlog.counts() == {
        "text": {"seen": 1500, "kept": 100, "dim": DIM},
        "audio": {"seen": 7, "kept": 7, "dim": DIM},
    }


def test_the_sample_is_uniform_over_everything_seen_not_the_first_or_last() -> None:
    # Vector number i carries i in its first coordinate; a uniform sample of 0..9999 has mean
    # ~5000 (a first-come sample would have ~250, a last-come one ~9750).
    capacity, n = 500, 10_000
    qlog = QueryLog(capacity, seed=3)
    x = np.zeros((n, 2), np.float32)
    x[:, 0] = np.arange(n)
    for s in range(0, n, 64):
        qlog.add("text", x[s : s + 64])
    kept = qlog.snapshot()["text"][:, 0]
    assert len(np.unique(kept)) == capacity
    assert abs(kept.mean() - n / 2) < 4 * n / np.sqrt(12 * capacity)
    assert (kept < n / 2).mean() == pytest.approx(0.5, abs=0.08)


def test_a_saved_log_survives_a_restart_and_keeps_sampling_from_where_it_stopped(
    tmp_path: Path,
) -> None:
    path = query_log_path(tmp_path)
    assert path == tmp_path / QUERY_LOG_FILENAME
    qlog = QueryLog(50, seed=0)
    qlog.add("text", unit(80, 1))
    qlog.add("image", unit(10, 2))
    qlog.save(path)
    again = QueryLog.load(path, 50)
    assert again.counts() == qlog.counts()
    for modality, rows in qlog.snapshot().items():
        np.testing.assert_array_equal(again.snapshot()[modality], rows)
    again.add("text", unit(20, 3))
    assert again.counts()["text"] == {"seen": 100, "kept": 50, "dim": DIM}
    assert {m: len(v) for m, v in load_query_sets(tmp_path).items()} == {"text": 50, "image": 10}


def test_loading_with_a_smaller_capacity_keeps_a_random_subset(tmp_path: Path) -> None:
    qlog = QueryLog(200, seed=0)
    qlog.add("text", unit(200, 1))
    qlog.save(tmp_path / "log.npz")
    small = QueryLog.load(tmp_path / "log.npz", 40).snapshot()["text"]
    assert small.shape == (40, DIM)
    full = qlog.snapshot()["text"]
    assert all((row == full).all(1).any() for row in small)


def test_a_missing_log_is_empty_and_a_corrupt_one_is_empty_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert QueryLog.load(tmp_path / "none.npz", 10).counts() == {}
    assert load_query_sets(tmp_path) == {}
    bad = query_log_path(tmp_path)
    bad.write_bytes(b"PK\x03\x04 not really a zip file")
    with caplog.at_level(logging.WARNING):
        assert QueryLog.load(bad, 10).counts() == {}
        assert load_query_sets(tmp_path) == {}
    assert "unreadable" in caplog.text
    # A well-formed npz whose arrays disagree with its state is corrupt too.
    np.savez(
        bad,
        state=np.frombuffer(
            json.dumps({"format": 1, "modalities": {"text": {"seen": 3, "dim": 8}}}).encode(),
            np.uint8,
        ),
        text=np.zeros((3, 4), np.float32),
    )
    assert QueryLog.load(bad, 10).counts() == {}


def test_the_file_holds_only_float32_embeddings_and_a_json_state(tmp_path: Path) -> None:
    qlog = QueryLog(10, seed=0)
    qlog.add("text", unit(5, 1))
    qlog.add("audio", unit(5, 2))
    path = tmp_path / QUERY_LOG_FILENAME
    qlog.save(path)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["audio.npy", "state.npy", "text.npy"]
    with np.load(path, allow_pickle=False) as data:  # no pickled objects anywhere
        assert data["text"].dtype == np.float32 and data["audio"].dtype == np.float32
        state = json.loads(bytes(data["state"]).decode())
    assert set(state) == {"format", "capacity_per_modality", "modalities"}
    assert state["modalities"]["text"] == {"seen": 5, "dim": DIM}


def test_bad_embeddings_are_refused_and_nothing_of_the_call_is_kept() -> None:
    qlog = QueryLog(10)
    qlog.add("text", unit(3, 0))
    bad = unit(2, 1)
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        qlog.add("text", bad)
    with pytest.raises(ValueError, match="16-d so far"):
        qlog.add("text", unit(2, 1, dim=8))
    with pytest.raises(ValueError, match="numeric"):
        qlog.add("text", np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="modality"):
        qlog.add("../etc", unit(1, 0))
    with pytest.raises(ValueError, match="modality"):
        qlog.add("state", unit(1, 0))
    assert qlog.counts()["text"] == {"seen": 3, "kept": 3, "dim": DIM}


def test_concurrent_adds_lose_no_count(tmp_path: Path) -> None:
    qlog = QueryLog(64, seed=0)

    def worker(i: int) -> None:
        for j in range(50):
            qlog.add("text", unit(4, i * 1000 + j))
            if j % 10 == 0:
                qlog.save(tmp_path / f"log-{i}.npz")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert qlog.counts()["text"] == {"seen": 800, "kept": 64, "dim": DIM}
    assert not list(tmp_path.glob(".*tmp*"))  # every save replaced its temporary file


def test_a_save_replaces_the_file_atomically_and_a_failed_one_leaves_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = query_log_path(tmp_path)
    qlog = QueryLog(10)
    qlog.add("text", unit(3, 0))
    qlog.save(path)
    qlog.add("text", unit(3, 1))

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("cachebind.published.querylog.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        qlog.save(path)
    monkeypatch.undo()
    assert QueryLog.load(path, 10).counts()["text"]["seen"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [QUERY_LOG_FILENAME]


def test_version_listing_and_pruning_ignore_the_log(tmp_path: Path) -> None:
    for name in ("v000001", "v000002", "v000003"):
        (publishing.versions_dir(tmp_path) / name).mkdir(parents=True)
    (tmp_path / publishing.CURRENT_FILE).write_text("v000003\n")
    qlog = QueryLog(10)
    qlog.add("text", unit(2, 0))
    qlog.save(query_log_path(tmp_path))
    assert publishing.list_versions(tmp_path) == ["v000001", "v000002", "v000003"]
    assert publishing.prune(tmp_path, 1) == ["v000001", "v000002"]
    assert query_log_path(tmp_path).is_file()
    assert QueryLog.load(query_log_path(tmp_path), 10).counts()["text"]["seen"] == 2
