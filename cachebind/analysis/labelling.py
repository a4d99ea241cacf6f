"""Label side tables: one LanceDB table of zero-shot labels per images table and label set.

``<table>_labels_<digest>`` (the digest names the ordered label set) holds one row per labelled
image row, keyed by its id. Its schema metadata records the labels, the templates, the encoder
identity and top-k; a run refuses to add to a side table made with any of these different, so
one table never mixes two classifiers. Writing is exactly-once like the embedding job's (the
ids already committed are loaded when the table opens, every commit is one atomic append, and
an id seen before is dropped), so a run killed at any point and run again adds each row once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cachebind.analysis.classify import LABELS_SCHEMA_FIELDS
from cachebind.analysis.templates import LabelSetError
from cachebind.config import StoreConfig
from cachebind.store import CacheTable, connect
from cachebind.store.table import vectors_to_numpy
from cachebind.store.writer import IdSet

METADATA_KEY = b"cachebind_labels"
IDENTITY_KEYS = ("labels", "templates", "encoder", "top_k")


def label_set_digest(labels: Sequence[str]) -> str:
    return hashlib.blake2b(json.dumps(list(labels)).encode("utf-8"), digest_size=6).hexdigest()


def side_table_name(table: str, labels: Sequence[str]) -> str:
    """The side table of ``table`` for this ordered label set."""
    return f"{table}_labels_{label_set_digest(labels)}"


@dataclass(frozen=True)
class LabelSet:
    """What a side table's labels were computed with."""

    labels: list[str]
    templates: list[str]
    encoder: dict[str, Any]
    top_k: int

    def metadata(self, table: str) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "templates": self.templates,
            "encoder": self.encoder,
            "top_k": self.top_k,
            "table": table,
            "label_set": label_set_digest(self.labels),
        }


def labels_schema(meta: dict[str, Any]) -> pa.Schema:
    return pa.schema(LABELS_SCHEMA_FIELDS, metadata={METADATA_KEY: json.dumps(meta)})


def side_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


class LabelWriter:
    """Appends to one side table; knows the ids it already holds."""

    def __init__(self, store: StoreConfig, label_set: LabelSet, replace: bool = False) -> None:
        self.name = side_table_name(store.table, label_set.labels)
        db = connect(store)
        schema = labels_schema(label_set.metadata(store.table))
        if replace:
            db.drop_table(self.name, ignore_missing=True)
        try:
            self.table = db.open_table(self.name)
        except ValueError:  # lancedb's "Table … was not found"
            self.table = db.create_table(self.name, schema=schema, exist_ok=True)
        _check_same(side_metadata(self.table.schema), label_set.metadata(store.table), self.name)
        ids = self.table.to_lance().to_table(columns=["id"])["id"].to_numpy()
        self.done = IdSet(ids)
        self.commits = 0

    def append(self, rows: pa.Table) -> int:
        """Add the rows whose id is new, in one commit; returns how many were added."""
        if rows.num_rows == 0:
            return 0
        ids = rows["id"].to_numpy()
        _, first = np.unique(ids, return_index=True)
        keep = np.zeros(len(ids), dtype=bool)
        keep[first] = True
        keep &= ~self.done.contains(ids)
        fresh = rows if keep.all() else rows.filter(pa.array(keep))
        if fresh.num_rows:
            self.table.add(fresh.cast(self.table.schema))
            self.done.add(fresh["id"].to_numpy())
            self.commits += 1
        return fresh.num_rows


def _check_same(have: dict[str, Any], want: dict[str, Any], name: str) -> None:
    differing = [k for k in IDENTITY_KEYS if have.get(k) != want.get(k)]
    if differing:
        raise LabelSetError(
            f"side table {name} was labelled with other {', '.join(differing)}; refusing to "
            "mix two classifiers in one table. Start it again with `cachebind classify "
            "--replace` (replace=True)"
        )


def iter_unlabelled(
    table: CacheTable,
    done: IdSet,
    batch_rows: int,
    columns: Sequence[str] = (),
    limit: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, pa.Table]]:
    """(ids, vectors, extra columns) of the rows of ``table`` not in ``done``, in table order,
    at most ``batch_rows`` at a time and ``limit`` in all."""
    left = limit if limit is not None else -1
    wanted = ["id", "vector", *columns]
    for batch in table.dataset.to_batches(columns=wanted, batch_size=batch_rows):
        if left == 0:
            return
        ids = batch.column("id").to_numpy()
        fresh = ~done.contains(ids)
        if not fresh.any():
            continue
        batch = batch.filter(pa.array(fresh))
        if left > 0:
            batch = batch.slice(0, left)
            left -= batch.num_rows
        rest = pa.Table.from_batches([batch]).select(list(columns))
        yield batch.column("id").to_numpy(), vectors_to_numpy(batch.column("vector")), rest


def open_side_table(store: StoreConfig, name: str) -> Any:
    try:
        return connect(store).open_table(name)
    except ValueError as exc:
        raise FileNotFoundError(
            f"no label table {name!r} in {store.uri}: run `cachebind classify` first"
        ) from exc


def label_tables(store: StoreConfig) -> dict[str, dict[str, Any]]:
    """name -> recorded metadata of every side table of ``store.table``."""
    db = connect(store)
    prefix = f"{store.table}_labels_"
    out = {}
    for name in table_names(db):
        if name.startswith(prefix):
            out[name] = side_metadata(db.open_table(name).schema)
    return out


def table_names(db: Any) -> list[str]:
    """Every table of a LanceDB database (``list_tables`` pages; all pages are read)."""
    names: list[str] = []
    token = None
    while True:
        page = db.list_tables(page_token=token)
        names.extend(page.tables)
        token = page.page_token
        if not token:
            return names


def ids_with_labels(store: StoreConfig, name: str, labels: Sequence[str]) -> np.ndarray:
    """Sorted ids of the rows whose best label is one of ``labels`` (for search filters)."""
    side = open_side_table(store, name).to_lance()
    wanted = pc.field("label").isin(pa.array(list(labels), pa.string()))
    return np.sort(side.to_table(columns=["id"], filter=wanted)["id"].to_numpy())
