"""Arrow schemas of the cache's LanceDB tables and the stable row id."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

EMBED_DIM = 1024
SCHEMA_VERSION = "1"
METADATA_KEY = b"cachebind"


def row_id(source_key: str) -> int:
    """A stable, non-negative int64 id derived from the source key.

    The same key always gives the same id, so a re-run of a job upserts instead of duplicating,
    and FAISS (which stores int64 labels) can carry the id directly.
    """
    digest = hashlib.blake2b(source_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def vector_type(dtype: str = "float16", dim: int = EMBED_DIM) -> pa.DataType:
    value = {"float16": pa.float16(), "float32": pa.float32()}[dtype]
    return pa.list_(value, dim)


def views_type(views: int, dtype: str = "float16", dim: int = EMBED_DIM) -> pa.DataType:
    """``view_vectors``: the ``views`` vectors of a row one after another, a fixed-size list of
    ``views · dim`` values of the ``vector`` column's dtype. One level, not a list of vectors:
    lancedb 0.40's ``add`` writes nested fixed-size lists unreadably (Lance's reader then fails
    with "Invalid range"), and a flat list reshapes for free."""
    return vector_type(dtype, views * dim)


def images_schema(
    *,
    dtype: str = "float16",
    dim: int = EMBED_DIM,
    text_vector: bool = False,
    thumbnail: bool = True,
    views: int = 0,
    tokens: int = 0,
    extra: dict[str, tuple[int, int]] | None = None,
    metadata: dict[str, Any] | None = None,
) -> pa.Schema:
    """The ``images`` table: one row per cached sample, ``vector`` is F_key = F_value (the
    centre crop). ``views`` > 0 adds ``view_vectors`` [views · dim]: the features of augmented
    crops, for training only (indexes and serving read ``vector``). ``tokens`` > 0 adds
    ``patch_tokens``: that many float16 values a row, the centre crop's patch tokens
    [patches · width] one after another (``embed --tokens``; metadata ``tokens`` names the
    layer and shape). ``extra`` maps each extra encoder (``embed --extra-encoder``) to its
    (dim, token values): ``vector_<name>`` [dim] and, when token values > 0,
    ``patch_tokens_<name>`` float16 (metadata ``extra_encoders`` records each identity)."""
    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("vector", vector_type(dtype, dim), nullable=False),
    ]
    if text_vector:
        fields.append(pa.field("text_vector", vector_type(dtype, dim)))
    if views:
        fields.append(pa.field("view_vectors", views_type(views, dtype, dim), nullable=False))
    if tokens:
        fields.append(pa.field("patch_tokens", vector_type("float16", tokens), nullable=False))
    for name, (extra_dim, extra_tokens) in sorted((extra or {}).items()):
        fields.append(pa.field(f"vector_{name}", vector_type(dtype, extra_dim), nullable=False))
        if extra_tokens:
            column = vector_type("float16", extra_tokens)
            fields.append(pa.field(f"patch_tokens_{name}", column, nullable=False))
    if thumbnail:
        fields.append(pa.field("thumbnail", pa.binary()))
    meta = {METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **(metadata or {})})}
    return pa.schema(fields, metadata=meta)


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)
"""The ``errors`` table: one row per sample that could not be cached, and why."""


def table_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The cachebind metadata (encoder, checkpoint identity, preprocessing version …)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def view_count(schema: pa.Schema) -> int:
    """How many augmented views a table's rows carry (0 without ``view_vectors``)."""
    if "view_vectors" not in schema.names:
        return 0
    views: int = (
        schema.field("view_vectors").type.list_size // schema.field("vector").type.list_size
    )
    return views
