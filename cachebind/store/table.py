"""Read access to the cache's ``images`` table, shared by indexing, the cache model and serving."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cachebind.config import StoreConfig
from cachebind.store.schema import table_metadata


@dataclass
class CacheTable:
    """A handle on one version of the images table.

    ``version`` is pinned at open time so that everything read through this handle (row count,
    ids, vectors) comes from the same snapshot, whatever a running job appends meanwhile.
    """

    table: Any  # lancedb.table.LanceTable
    version: int

    @classmethod
    def open(cls, config: StoreConfig, version: int | None = None) -> CacheTable:
        try:
            table = lancedb.connect(config.uri).open_table(config.table)
        except ValueError as exc:  # lancedb's "Table 'x' was not found"
            raise FileNotFoundError(
                f"no table {config.table!r} in {config.uri}: run `cachebind embed` first"
            ) from exc
        if version is not None:
            table.checkout(version)
        return cls(table=table, version=table.version)

    @property
    def dataset(self) -> Any:  # lance.LanceDataset at the pinned version
        return self.table.to_lance()

    @property
    def metadata(self) -> dict[str, Any]:
        return table_metadata(self.table.schema)

    @property
    def dim(self) -> int:
        return self.table.schema.field("vector").type.list_size

    def count(self) -> int:
        return self.dataset.count_rows()

    def iter_vectors(self, batch_size: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids int64 [n], vectors float32 [n, d]) in table order."""
        for batch in self.dataset.to_batches(columns=["id", "vector"], batch_size=batch_size):
            yield batch.column("id").to_numpy(), vectors_to_numpy(batch.column("vector"))

    def ids(self) -> np.ndarray:
        return self.dataset.to_table(columns=["id"]).column("id").to_numpy()

    def rows(self, ids: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        """Rows for ``ids``, in the order asked (missing ids are left out)."""
        ids = [int(i) for i in ids]
        if not ids:
            return self.dataset.schema.empty_table().select(list(columns or []))
        found = self.dataset.to_table(
            columns=list(columns) if columns else None,
            filter=pc.field("id").isin(pa.array(ids, pa.int64())),
        )
        if columns and "id" not in columns:
            order_ids = self.dataset.to_table(
                columns=["id"], filter=pc.field("id").isin(pa.array(ids, pa.int64()))
            ).column("id")
        else:
            order_ids = found.column("id")
        position = {int(v): i for i, v in enumerate(order_ids.to_pylist())}
        take = [position[i] for i in ids if i in position]
        return found.take(pa.array(take, pa.int64()))

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The exact cached vectors F_value for ``ids`` (float32 [len(ids), d]).

        Raises KeyError naming the ids that are not in the table.
        """
        table = self.rows(ids, columns=["id", "vector"])
        if table.num_rows != len(ids):
            missing = sorted(set(int(i) for i in ids) - set(table.column("id").to_pylist()))
            raise KeyError(f"ids not in table version {self.version}: {missing[:10]}")
        return vectors_to_numpy(table.column("vector"))


def vectors_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list vector column as a float32 [n, d] array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dim)
