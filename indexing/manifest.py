"""What a version records about itself, and the alignment check against a table."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cachebind.errors import IndexMismatchError
from cachebind.store import CacheTable

MANIFEST_FORMAT = 1


def ids_checksum(ids: np.ndarray) -> str:
    """sha256 over the int64 table ids in index order (little-endian), as hex."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def table_identity(table: CacheTable, ids: np.ndarray) -> dict[str, Any]:
    """The table facts a version is built from: where, which version, how many rows, which ids."""
    try:
        uri = str(table.dataset.uri)
    except Exception:  # a remote table without a local URI
        uri = None
    return {
        "uri": uri,
        "version": int(table.version),
        "row_count": int(len(ids)),
        "ids_sha256": ids_checksum(ids),
    }


def check_alignment(manifest: dict[str, Any], table: CacheTable, table_ids: np.ndarray) -> None:
    """Raise IndexMismatchError unless ``table`` is the one the index was built from.

    Checked in order of cost: table version, row count, then the checksum of the ids in order.
    Serving an index against another table gives wrong neighbours silently (ids that point at
    other rows, or at none), which is what this refuses.
    """
    built = manifest["table"]
    version = manifest.get("version", "?")
    if int(built["version"]) != int(table.version):
        raise IndexMismatchError(
            f"index {version} was built from table version {built['version']}, but the table "
            f"is at version {table.version}: rebuild (`cachebind index`) or add the new rows "
            "(indexing.add_rows), or open the table at the index's version"
        )
    if int(built["row_count"]) != len(table_ids):
        raise IndexMismatchError(
            f"index {version} holds {built['row_count']} rows, the table has {len(table_ids)}"
        )
    checksum = ids_checksum(table_ids)
    if checksum != built["ids_sha256"]:
        raise IndexMismatchError(
            f"index {version} was built from other ids than the table's (id sha256 "
            f"{built['ids_sha256'][:12]}… != {checksum[:12]}…): the rows differ or are reordered"
        )
