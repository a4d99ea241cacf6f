"""Read access to the cache's ``images`` table, shared by indexing, the cache model and serving."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lancedb
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from cachebind.arrays import Bools, Floats, Ints
from cachebind.config import StoreConfig
from cachebind.storage import lance_options
from cachebind.store.schema import table_metadata


def connect(config: StoreConfig) -> Any:
    """The LanceDB database at ``config.uri``, with the object-store options it needs."""
    return lancedb.connect(config.uri, storage_options=lance_options(config.uri, config.s3))


@dataclass
class CacheTable:
    """A handle on one version of the images table.

    ``version`` is pinned at open time so that everything read through this handle (row count,
    ids, vectors) comes from the same snapshot, whatever a running job appends meanwhile.
    Lookups by id go through a sorted id array built once per handle (16 bytes a row) and
    lance's ``take``, so fetching the k rows of a query costs O(k), not a scan of the table.
    """

    table: Any  # lancedb.table.LanceTable
    version: int
    storage_options: dict[str, str] | None = field(default=None, repr=False)
    """Lance's options for the table's object store (credentials: never shown), for processes
    that open the dataset again by its URI (the sharded index build)."""
    column: str = "vector"
    """The global vector column this handle reads as ``vector`` (``dim``, ``vectors``,
    ``iter_vectors``): ``vector`` or an extra encoder's ``vector_<name>``."""
    _dataset: Any = field(default=None, repr=False)
    _by_id: tuple[Ints, Ints] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(
        cls, config: StoreConfig, version: int | None = None, column: str = "vector"
    ) -> CacheTable:
        try:
            table = connect(config).open_table(config.table)
        except ValueError as exc:  # lancedb's "Table 'x' was not found"
            raise FileNotFoundError(
                f"no table {config.table!r} in {config.uri}: run `cachebind embed` first"
            ) from exc
        if version is not None:
            table.checkout(version)
        options = lance_options(config.uri, config.s3)
        names = table.schema.names
        if column not in names:
            have = [n for n in names if n == "vector" or n.startswith("vector_")]
            raise ValueError(
                f"table {config.table!r} has no column {column!r}; its vector columns are "
                f"{have} (an extra encoder's is written by `embed --extra-encoder`)"
            )
        return cls(table=table, version=table.version, storage_options=options, column=column)

    @property
    def dataset(self) -> Any:  # lance.LanceDataset at the pinned version
        # One dataset object per handle: row offsets are only meaningful within its version.
        if self._dataset is None:
            self._dataset = self.table.to_lance()
        return self._dataset

    @property
    def metadata(self) -> dict[str, Any]:
        return table_metadata(self.table.schema)

    @property
    def dim(self) -> int:
        return int(self.table.schema.field(self.column).type.list_size)

    def count(self) -> int:
        return int(self.dataset.count_rows())

    def iter_vectors(self, batch_size: int = 65_536) -> Iterator[tuple[Ints, Floats]]:
        """Yield (ids int64 [n], vectors float32 [n, d]) in table order."""
        column = self.column
        for batch in self.dataset.to_batches(columns=["id", column], batch_size=batch_size):
            yield batch.column("id").to_numpy(), vectors_to_numpy(batch.column(column))

    def ids(self) -> Ints:
        ids: Ints = self.dataset.to_table(columns=["id"]).column("id").to_numpy()
        return ids

    def build_id_lookup(self) -> None:
        """Map ids to row offsets now (otherwise done by the first lookup)."""
        with self._lock:
            if self._by_id is None:
                ids = self.ids()
                order = np.argsort(ids, kind="stable")
                self._by_id = (ids[order], order)

    def offsets(self, ids: Sequence[int] | Ints) -> tuple[Bools, Ints]:
        """(found mask over ``ids``, row offsets of the found ones, in the order asked)."""
        if self._by_id is None:
            self.build_id_lookup()
        assert self._by_id is not None
        sorted_ids, order = self._by_id
        ids = np.asarray(ids, dtype=np.int64).ravel()
        pos = np.searchsorted(sorted_ids, ids)
        clipped = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        found = (pos < len(sorted_ids)) & (sorted_ids[clipped] == ids)
        return found, order[clipped[found]]

    def rows(self, ids: Sequence[int] | Ints, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows for ``ids``, in the order asked (ids not in this version are left out)."""
        columns = list(columns) if columns else self.dataset.schema.names
        _, offsets = self.offsets(ids)
        if len(offsets) == 0:
            return self.dataset.schema.empty_table().select(columns)
        return self.dataset.take(offsets.tolist(), columns=columns)

    def present_offsets(self, ids: Sequence[int] | Ints) -> Ints:
        """The row offsets of ``ids``; KeyError naming (up to 10) ids not in this version."""
        found, offsets = self.offsets(ids)
        if not found.all():
            missing = np.asarray(ids, dtype=np.int64).ravel()[~found][:10].tolist()
            raise KeyError(f"ids not in table version {self.version}: {missing}")
        return offsets

    def vectors(self, ids: Sequence[int] | Ints) -> Floats:
        """The exact cached vectors F_value for ``ids`` (float32 [len(ids), d]).

        Raises KeyError naming the ids that are not in this table version.
        """
        offsets = self.present_offsets(ids)
        if len(offsets) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        taken = self.dataset.take(offsets.tolist(), columns=[self.column])
        return vectors_to_numpy(taken[self.column])

    def tokens_record(self, encoder: str | None = None) -> TokensRecord:
        """What this version records of ``encoder``'s patch tokens (an extra encoder's name,
        or None / ``"imagebind"`` for the trunk's); ValueError naming the embed flags when it
        stores none."""
        extra = encoder not in (None, "imagebind")
        name = f"patch_tokens_{encoder}" if extra else "patch_tokens"
        metadata = self.metadata
        if extra:
            entry = dict((metadata.get("extra_encoders") or {}).get(encoder) or {})
            recorded, identity = entry.pop("tokens", None), entry or None
        else:
            recorded, identity = metadata.get("tokens"), metadata.get("encoder")
        if not isinstance(recorded, dict) or name not in self.dataset.schema.names:
            raise ValueError(
                f"table version {self.version} has no {name} (embed --tokens"
                + (f" --extra-encoder {encoder}=DIR)" if extra else ")")
            )
        layer = recorded.get("layer")
        return TokensRecord(
            column=name,
            patches=int(recorded["patches"]),
            width=int(recorded["width"]),
            layer=None if layer is None else int(layer),
            cls=bool(recorded.get("cls", False)),
            identity=None if identity is None else json.dumps(identity, sort_keys=True),
        )

    def patch_tokens(
        self, ids: Sequence[int] | Ints, encoder: str | None = None
    ) -> npt.NDArray[np.float16]:
        """The cached patch tokens of ``ids`` (``embed --tokens``): float16
        [len(ids), patches, width]; ``encoder`` names an extra encoder's
        (``patch_tokens_<name>``, e.g. ``clip336``: LLaVA-1.5's), else ImageBind's. KeyError for
        ids not in this version; ValueError on a table embedded without those tokens."""
        record = self.tokens_record(encoder)
        offsets = self.present_offsets(ids)
        patches, width = record.patches, record.width
        if len(offsets) == 0:
            return np.zeros((0, patches, width), dtype=np.float16)
        column = self.dataset.take(offsets.tolist(), columns=[record.column])[record.column]
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        # A copy: Arrow's buffers are read-only, and training hands these to torch.
        values = np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float16)
        return values.reshape(-1, patches, width)


@dataclass(frozen=True)
class TokensRecord:
    """An encoder's cached patch tokens as a table version records them."""

    column: str
    patches: int
    width: int
    layer: int | None
    """The hidden state they are (as the embedding job was told: may be negative)."""
    cls: bool
    identity: str | None
    """The encoder's recorded identity (weights sha256 among others), canonical JSON."""


def vectors_to_numpy(column: pa.ChunkedArray | pa.Array) -> Floats:
    """A fixed-size-list vector column as a float32 [n, d] array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values: Floats = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dim)
