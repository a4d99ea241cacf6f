"""store: the LanceDB tables that hold the cache (rows, vectors, errors).

The table classes are imported on first use: ``lancedb`` takes about 1.5 s of CPU to import
(its namespace client), and the processes that only name rows or read the schema (a job's
decode tasks, the sandbox) never open a table.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cachebind.store.errors import EncoderMismatchError, TableMismatchError
from cachebind.store.schema import (
    EMBED_DIM,
    ERRORS_SCHEMA,
    images_schema,
    row_id,
    table_metadata,
)

if TYPE_CHECKING:
    from cachebind.store.table import CacheTable, connect
    from cachebind.store.writer import PROGRESS_SCHEMA, CacheWriter, check_compatible

_LAZY = {
    "CacheTable": "cachebind.store.table",
    "connect": "cachebind.store.table",
    "PROGRESS_SCHEMA": "cachebind.store.writer",
    "CacheWriter": "cachebind.store.writer",
    "check_compatible": "cachebind.store.writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "EMBED_DIM",
    "ERRORS_SCHEMA",
    "PROGRESS_SCHEMA",
    "CacheTable",
    "CacheWriter",
    "EncoderMismatchError",
    "TableMismatchError",
    "check_compatible",
    "connect",
    "images_schema",
    "row_id",
    "table_metadata",
]
