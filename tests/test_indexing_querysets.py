"""Query files a user supplies: .npy, parquet and Lance are read; anything else is refused with a
message naming the file and the problem, before a build spends any time."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cachebind.errors import InputError
from indexing.quality.querysets import parse_query_spec, read_query_file

DIM = 8


def rows(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)


def test_npy_parquet_and_lance_files_give_the_same_queries(tmp_path: Path) -> None:
    x = rows()
    np.save(tmp_path / "q.npy", x)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM)
    pq.write_table(pa.table({"vector": fixed}), tmp_path / "q.parquet")
    variable = pa.array(x.astype(np.float64).tolist())  # list<double>: also accepted
    pq.write_table(pa.table({"embedding": variable, "text": ["t"] * 5}), tmp_path / "e.parquet")
    lance.write_dataset(pa.table({"embedding": fixed}), tmp_path / "q.lance")
    for name in ("q.npy", "q.parquet", "e.parquet", "q.lance"):
        np.testing.assert_allclose(read_query_file(tmp_path / name, DIM), x, rtol=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.save(p / "q.npy", rows()[:, :4]), "shape"),
        (lambda p: np.save(p / "q.npy", np.full((3, DIM), np.nan, np.float32)), "NaN"),
        (lambda p: np.save(p / "q.npy", np.zeros((0, DIM), np.float32)), "no queries"),
        (lambda p: np.save(p / "q.npy", np.array([["a"] * DIM])), "not numbers"),
        (lambda p: np.save(p / "q.npy", np.array([{"x": 1}], dtype=object)), "cannot be read"),
        (lambda p: (p / "q.npy").write_bytes(b"\x93NUMPY garbage"), "cannot be read"),
        (lambda p: pq.write_table(pa.table({"vec": [[1.0] * DIM]}), p / "q.parquet"), "no column"),
        (lambda p: pq.write_table(pa.table({"vector": ["a"]}), p / "q.parquet"), "not a list"),
        (
            lambda p: pq.write_table(pa.table({"vector": [[1.0] * DIM, [1.0]]}), p / "q.parquet"),
            "lengths",
        ),
        (lambda p: (p / "q.csv").write_text("1,2"), "not a .npy"),
    ],
)
def test_a_bad_query_file_is_refused_with_a_clear_error(tmp_path: Path, make, message) -> None:
    make(tmp_path)
    (path,) = [p for p in tmp_path.iterdir()]
    with pytest.raises(InputError, match=message) as info:
        read_query_file(path, DIM)
    assert str(path) in str(info.value)


def test_a_missing_file_and_a_malformed_spec_are_explained(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_query_file(tmp_path / "none.npy", DIM)
    assert parse_query_spec("text=/x/q.npy") == ("text", Path("/x/q.npy"))
    for spec in ("q.npy", "text=", "Text Modality=q.npy", "../x=q.npy"):
        with pytest.raises(InputError, match="--queries"):
            parse_query_spec(spec)
