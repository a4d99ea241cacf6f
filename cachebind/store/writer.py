"""Exactly-once writing of the cache's rows, its errors and a job's progress.

Why this is exact after a crash at any point: every ``add`` to a LanceDB table is one atomic Lance
commit (a killed process leaves either the whole batch or none of it), the writer loads the ids
already committed (rows and errors) when it opens, and it drops every incoming id it has already
seen. A partition is recorded as finished in the progress table only after all of its rows and
errors were committed, so a finished record is a promise, and an unfinished partition is simply
read again with its committed ids skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cachebind.config import StoreConfig
from cachebind.storage import lance_options
from cachebind.store import fragments
from cachebind.store.errors import EncoderMismatchError, TableMismatchError
from cachebind.store.identity import differences, recorded_encoder
from cachebind.store.schema import ERRORS_SCHEMA, table_metadata, view_count
from cachebind.store.table import connect

PROGRESS_SCHEMA = pa.schema(
    [
        pa.field("partition", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("finished_at", pa.float64()),
    ]
)
"""``_<table>_progress``: one row per partition whose samples are all committed."""

# What must agree between a table and the job appending to it besides the encoder (other
# metadata, such as the source or the creation time, may differ between runs).
IDENTITY_KEYS = ("views", "tokens", "extra_encoders")
"""``views`` (embed --views: count and augmentation), ``tokens`` (embed --tokens: layer and
shape) and ``extra_encoders`` (embed --extra-encoder: each one's identity and shape) are
absent, so equal, on tables without."""


def progress_table_name(table: str) -> str:
    return f"_{table}_progress"


class IdSet:
    """A set of int64 ids that stays compact at millions of entries.

    A sorted numpy array holds the bulk (8 bytes an id), a Python set the recent additions; the
    set is folded into the array when it grows, so membership is a binary search plus a lookup.
    """

    def __init__(self, ids: np.ndarray | None = None, fold_at: int = 200_000) -> None:
        self._base = np.unique(np.asarray(ids if ids is not None else [], dtype=np.int64))
        self._recent: set[int] = set()
        self._fold_at = fold_at

    def __len__(self) -> int:
        return len(self._base) + len(self._recent)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        if len(self._base):
            pos = np.searchsorted(self._base, ids).clip(max=len(self._base) - 1)
            found = self._base[pos] == ids
        if self._recent:
            found |= np.fromiter((int(i) in self._recent for i in ids), bool, len(ids))
        return found

    def add(self, ids: Iterable[int]) -> None:
        self._recent.update(int(i) for i in ids)
        if len(self._recent) >= self._fold_at:
            merged = np.fromiter(self._recent, np.int64, len(self._recent))
            self._base = np.union1d(self._base, merged)
            self._recent.clear()


@dataclass
class WriteResult:
    written: int
    skipped: int
    """Rows dropped because their id was already committed (by this run or an earlier one)."""


class CacheWriter:
    """Appends to the images table, the errors table and the progress table of one store.

    Opening creates missing tables (the images table with ``schema``, whose cachebind metadata
    records the encoder identity) and refuses an existing images table built by another encoder
    or with another layout, raising :class:`EncoderMismatchError` / :class:`TableMismatchError`.
    """

    def __init__(self, config: StoreConfig, schema: pa.Schema) -> None:
        self.config = config
        self.db = connect(config)
        self.images = self._open_or_create(config.table, schema)
        check_compatible(self.images.schema, schema, f"{config.uri}/{config.table}")
        self.schema = self.images.schema
        self.errors = self._open_or_create(config.errors_table_name, ERRORS_SCHEMA)
        self.progress = self._open_or_create(progress_table_name(config.table), PROGRESS_SCHEMA)
        self.row_ids = IdSet(_column(self.images, "id"))
        self.error_ids = IdSet(_column(self.errors, "id"))
        self.commits = 0
        self.storage_options = lance_options(config.uri, config.s3)
        self.images_uri = str(self.images.to_lance().uri)
        """Where workers write fragments of the images table (a path or an object-store URI)."""

    def _open_or_create(self, name: str, schema: pa.Schema) -> Any:
        try:
            return self.db.open_table(name)
        except ValueError:  # "Table … was not found"
            # exist_ok covers a table created meanwhile by another process.
            return self.db.create_table(name, schema=schema, exist_ok=True)

    # -- reading the state left by earlier runs ---------------------------------------------

    def finished_partitions(self) -> dict[str, str]:
        """partition id -> fingerprint of every partition an earlier run finished."""
        table = self.progress.to_lance().to_table(columns=["partition", "fingerprint"])
        return dict(
            zip(table["partition"].to_pylist(), table["fingerprint"].to_pylist(), strict=True)
        )

    def committed_by_shard(self, shards: set[str]) -> dict[str, set[int]]:
        """Ids of rows and errors already committed for each of ``shards`` (one scan of the
        ``id`` and ``shard`` columns): an unfinished partition's resume point."""
        found: dict[str, set[int]] = {}
        if not shards:
            return found
        for table in (self.images, self.errors):
            wanted = pc.field("shard").isin(pa.array(sorted(shards), pa.string()))
            data = table.to_lance().to_table(columns=["id", "shard"], filter=wanted)
            for sid, shard in zip(data["id"].to_pylist(), data["shard"].to_pylist(), strict=True):
                if shard in shards:
                    found.setdefault(shard, set()).add(sid)
        return found

    def holders(self, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """``id -> (shard, "rows" | "errors")`` for committed ids: which partition holds a key
        that another partition repeats (one filtered scan of each table; duplicates are rare)."""
        found: dict[int, tuple[str, str]] = {}
        if not len(ids):
            return found
        wanted = pc.field("id").isin(pa.array([int(i) for i in ids], pa.int64()))
        for name, table in (("rows", self.images), ("errors", self.errors)):
            data = table.to_lance().to_table(columns=["id", "shard"], filter=wanted)
            for sid, shard in zip(data["id"].to_pylist(), data["shard"].to_pylist(), strict=True):
                found.setdefault(sid, (shard, name))
        return found

    # -- writing -------------------------------------------------------------------------------

    def write_rows(self, rows: pa.Table) -> WriteResult:
        """Append the rows whose id is new, in one commit."""
        return self._append(self.images, self.row_ids, rows.cast(self.schema))

    def write_errors(self, errors: pa.Table) -> WriteResult:
        return self._append(self.errors, self.error_ids, errors.cast(ERRORS_SCHEMA))

    def _append(self, table: Any, seen: IdSet, rows: pa.Table) -> WriteResult:
        if rows.num_rows == 0:
            return WriteResult(0, 0)
        ids = rows["id"].to_numpy()
        # Duplicates inside the batch (a key repeated in the source) are dropped too.
        _, first = np.unique(ids, return_index=True)
        keep = np.zeros(len(ids), dtype=bool)
        keep[first] = True
        keep &= ~seen.contains(ids)
        fresh = rows.filter(pa.array(keep)) if not keep.all() else rows
        if fresh.num_rows:
            table.add(fresh)
            self.commits += 1
            seen.add(fresh["id"].to_numpy())
        return WriteResult(written=fresh.num_rows, skipped=rows.num_rows - fresh.num_rows)

    def commit_fragments(self, descriptors: Sequence[str], ids: np.ndarray) -> None:
        """Commit fragments written elsewhere (:mod:`cachebind.store.fragments`) in one
        version. The caller guarantees that ``ids`` (the fragments' rows) are all new."""
        if not descriptors:
            return
        fragments.commit(
            self.images_uri, descriptors, int(self.images.version), self.storage_options
        )
        self.images.checkout_latest()  # the lancedb handle follows the commit made beside it
        self.commits += 1
        self.row_ids.add(ids)

    def finish_partitions(self, records: Sequence[dict[str, Any]]) -> None:
        """Record partitions whose rows and errors are all committed (call after writing them)."""
        if not records:
            return
        now = time.time()
        rows = [{**r, "finished_at": r.get("finished_at", now)} for r in records]
        self.progress.add(pa.Table.from_pylist(rows, schema=PROGRESS_SCHEMA))
        self.commits += 1

    def fragment_count(self) -> int:
        return len(self.images.to_lance().get_fragments())

    def compact(self) -> None:
        """Merge the many small fragments of a long job (one per commit or batch) into fewer
        files. Lance's compaction only: old versions are removed by the store's gc, which
        spares the versions published indexes use (lancedb's ``optimize`` would also clean
        up, by age alone)."""
        for table in (self.images, self.errors, self.progress):
            table.to_lance().optimize.compact_files()
            table.checkout_latest()


def check_compatible(existing: pa.Schema, wanted: pa.Schema, where: str) -> None:
    """Raise unless a job writing rows of ``wanted`` may append to a table of ``existing``."""
    have_views, want_views = view_count(existing), view_count(wanted)
    if have_views != want_views:
        raise TableMismatchError(
            f"table {where} was embedded with {have_views} augmented views a row "
            f"(embed.views = {have_views}) and this job asks for {want_views}: a table keeps "
            f"its views setting. Re-run with --views {have_views}, or write to a new table "
            "(--table / store.table)"
        )
    have, want = table_metadata(existing), table_metadata(wanted)
    differing = _encoder_differences(have, want)
    differing.update(
        {k: (have.get(k), want.get(k)) for k in IDENTITY_KEYS if have.get(k) != want.get(k)}
    )
    if differing:
        lines = "\n".join(
            f"  {k}: table has {json.dumps(had, sort_keys=True)}, "
            f"job has {json.dumps(wants, sort_keys=True)}"
            for k, (had, wants) in differing.items()
        )
        raise EncoderMismatchError(
            f"table {where} was built by another encoder; refusing to mix embeddings.\n{lines}\n"
            "Write to a new table (store.table) or delete this one."
        )
    have_fields = {f.name: f.type for f in existing}
    want_fields = {f.name: f.type for f in wanted}
    if have_fields != want_fields:
        diff = sorted(
            f"{name}: table {have_fields.get(name)} vs job {want_fields.get(name)}"
            for name in set(have_fields) | set(want_fields)
            if have_fields.get(name) != want_fields.get(name)
        )
        raise TableMismatchError(
            f"table {where} has other columns than this job writes ({'; '.join(diff)}); "
            "match store.vector_dtype / embed.thumbnails / embed.caption_embeddings to the "
            "table, or write to a new table"
        )


def _encoder_differences(have: dict[str, Any], want: dict[str, Any]) -> dict[str, tuple]:
    """The identity fields that differ between a table's encoder and a job's (the checkpoint's
    path may differ: its sha256 may not); whole values where either records no identity."""
    recorded, wanted = recorded_encoder(have), recorded_encoder(want)
    if recorded is not None and wanted is not None:
        return differences(wanted, recorded)
    keys = ("encoder", "preprocess_version")
    return {k: (have.get(k), want.get(k)) for k in keys if have.get(k) != want.get(k)}


def _column(table: Any, name: str) -> np.ndarray:
    return table.to_lance().to_table(columns=[name])[name].to_numpy()


def _eq(column: str, value: str) -> Any:
    return pc.field(column) == pa.scalar(value, pa.string())
