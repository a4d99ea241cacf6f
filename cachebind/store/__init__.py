"""store: the LanceDB tables that hold the cache (rows, vectors, errors)."""

from cachebind.store.schema import (
    EMBED_DIM,
    ERRORS_SCHEMA,
    images_schema,
    row_id,
    table_metadata,
)
from cachebind.store.table import CacheTable

__all__ = [
    "EMBED_DIM",
    "ERRORS_SCHEMA",
    "CacheTable",
    "images_schema",
    "row_id",
    "table_metadata",
]
