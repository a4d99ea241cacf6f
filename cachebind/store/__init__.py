"""store: the LanceDB tables that hold the cache (rows, vectors, errors)."""

from cachebind.store.errors import EncoderMismatchError, TableMismatchError
from cachebind.store.schema import (
    EMBED_DIM,
    ERRORS_SCHEMA,
    images_schema,
    row_id,
    table_metadata,
)
from cachebind.store.table import CacheTable, connect
from cachebind.store.writer import PROGRESS_SCHEMA, CacheWriter, check_compatible

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
