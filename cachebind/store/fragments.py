"""Lance fragments written by one process and committed by another (the distributed sink).

A worker writes a batch's rows as data files under the table's ``data/`` folder
(:func:`write_rows`) and sends the driver the fragment metadata as JSON; nothing is visible
until the driver commits it (:func:`commit`: one ``Append`` of many fragments, one new table
version, atomic). A descriptor the driver never commits leaves its data files unreferenced by
any version: garbage that :func:`cachebind.store.gc.collect_table` removes (``orphans``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

MAX_ROWS_PER_FILE = 1 << 20
"""Far above a batch, so one batch is one fragment (one data file)."""


def write_rows(
    rows: pa.Table, uri: str, schema: pa.Schema, storage_options: dict[str, str] | None
) -> list[str]:
    """Write ``rows`` (already in ``schema``) as uncommitted fragments of the dataset at
    ``uri``; returns each fragment's metadata as JSON, in row order."""
    from lance.fragment import write_fragments

    fragments = write_fragments(
        rows,
        uri,
        schema=schema,
        max_rows_per_file=MAX_ROWS_PER_FILE,
        storage_options=storage_options,
    )
    return [json.dumps(f.to_json()) for f in fragments]


def physical_rows(descriptor: str) -> int:
    return int(json.loads(descriptor)["physical_rows"])


def commit(
    uri: str,
    descriptors: Sequence[str],
    read_version: int,
    storage_options: dict[str, str] | None,
) -> int:
    """Append the fragments to the dataset in one commit; returns the new version."""
    import lance
    from lance.fragment import FragmentMetadata

    fragments = [FragmentMetadata.from_json(d) for d in descriptors]
    dataset = lance.LanceDataset.commit(
        uri,
        lance.LanceOperation.Append(fragments),
        read_version=read_version,
        storage_options=storage_options,
    )
    return int(dataset.version)


def read_uncommitted(uri: str, descriptor: str, storage_options: dict[str, str] | None) -> pa.Table:
    """The rows of a written, not yet committed fragment (one data file holding every
    column, as :func:`write_rows` writes them)."""
    from lance.file import LanceFileReader

    files: list[dict[str, Any]] = json.loads(descriptor)["files"]
    if len(files) != 1:
        raise ValueError(f"expected a fragment of one data file, got {len(files)}")
    path = f"{uri.rstrip('/')}/data/{files[0]['path']}"
    return LanceFileReader(path, storage_options=storage_options).read_all().to_table()


def keep_only(
    uri: str,
    descriptor: str,
    positions: Sequence[int],
    schema: pa.Schema,
    storage_options: dict[str, str] | None,
) -> list[str]:
    """Fragments holding only the rows at ``positions`` (row numbers in the file) of
    ``descriptor``: written anew, the old fragment left uncommitted (an orphan). By position,
    not id: one file may hold an id twice (a key repeated across partitions in one batch)."""
    rows = read_uncommitted(uri, descriptor, storage_options)
    fresh = rows.take(pa.array(list(positions), pa.int64()))
    return write_rows(fresh.cast(schema), uri, schema, storage_options) if fresh.num_rows else []
