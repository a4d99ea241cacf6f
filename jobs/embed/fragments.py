"""Stage 3a, on the workers (the distributed sink): an encoded batch's rows become a Lance
fragment at the table location, and only a descriptor travels on to the driver.

A block out of :func:`write_block` holds, per sample, what the driver needs to decide and
account (id, key, shard, status; the error fields of an error row), plus one ``fragment`` row
per data file written: its metadata JSON, its row count and the node that wrote it. Each ``ok``
row names the fragment holding it (``fragment_key``), so the driver can tell which ids a
fragment holds even if Ray splits a block. About 100 bytes a row reach the driver, instead
of the row (vector, caption, thumbnail: ~7 KB).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cachebind.config import Settings
from cachebind.store import fragments

if TYPE_CHECKING:
    from cachebind.store import CacheWriter

DESCRIPTOR_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("status", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("count", pa.int64()),
        pa.field("decode_s", pa.float64()),
        pa.field("encode_s", pa.float64()),
        pa.field("fragment_key", pa.int64()),
        pa.field("fragment", pa.string()),
        pa.field("node", pa.string()),
        pa.field("write_s", pa.float64()),
    ]
)
"""``status`` is ``ok`` / ``error`` / ``done`` as between the other stages, or ``fragment``
(one per data file: ``fragment`` its metadata JSON, ``count`` its rows)."""


@dataclass(frozen=True)
class FragmentTarget:
    """Where and how workers write the images table's fragments."""

    uri: str
    """The images dataset (``<store.uri>/<table>.lance``), seen by every node."""
    schema: pa.Schema
    storage_options: dict[str, str] | None
    vector_dtype: str
    captions: bool
    thumbnails: bool
    views: int = 0


def target_for(settings: Settings, writer: CacheWriter) -> FragmentTarget | None:
    """What encoder actors need to write the table's fragments (the workers sink only)."""
    if settings.embed.sink != "workers":
        return None
    return FragmentTarget(
        uri=writer.images_uri,
        schema=writer.schema,
        storage_options=writer.storage_options,
        vector_dtype=settings.store.vector_dtype,
        captions=settings.embed.caption_embeddings,
        thumbnails=settings.embed.thumbnails,
        views=settings.embed.views,
    )


def image_rows(
    rows: pa.Table, vector_dtype: str, captions: bool, thumbnails: bool, views: int = 0
) -> pa.Table:
    """The images-table columns of encoded ``ok`` rows (vectors in the table's dtype)."""
    dtype = np.dtype(vector_dtype)
    columns: dict[str, Any] = {
        name: rows[name] for name in ("id", "key", "caption", "url", "width", "height", "shard")
    }
    columns["vector"] = as_dtype(rows["vector"], dtype)
    if captions:
        columns["text_vector"] = as_dtype(rows["text_vector"], dtype)
    if views:
        columns["view_vectors"] = as_dtype(rows["view_vectors"], dtype)  # [views · dim] a row
    if "patch_tokens" in rows.column_names:  # embed --tokens: float16 whatever the vector's
        columns["patch_tokens"] = rows["patch_tokens"]
    for name in rows.column_names:  # embed --extra-encoder, in the table's (sorted) order
        if name.startswith("vector_"):
            columns[name] = as_dtype(rows[name], dtype)
        elif name.startswith("patch_tokens_"):
            columns[name] = rows[name]
    if thumbnails:
        columns["thumbnail"] = rows["thumbnail"]
    return pa.table(columns)


def as_dtype(column: pa.ChunkedArray, dtype: np.dtype) -> pa.FixedSizeListArray:
    """A vector column in the table's dtype, null entries (rows without a caption) kept."""
    column = column.combine_chunks()
    dim = column.type.list_size
    # .values keeps the slots of null entries (flatten would drop them).
    start = column.offset * dim
    values = column.values.slice(start, len(column) * dim)
    values = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    mask = column.is_null() if column.null_count else None
    return pa.FixedSizeListArray.from_arrays(pa.array(values), dim, mask=mask)


def write_block(out: pa.Table, target: FragmentTarget) -> pa.Table:
    """Write the ``ok`` rows of an encoded batch as fragments; return the descriptor block."""
    start = time.perf_counter()
    n = out.num_rows
    status = out["status"].to_numpy(zero_copy_only=False)
    ok = np.flatnonzero(status == "ok")
    keys = np.zeros(n, dtype=np.int64)
    extra: list[dict[str, Any]] = []
    if len(ok):
        rows = image_rows(out.take(pa.array(ok)), target.vector_dtype, target.captions,
                          target.thumbnails, target.views).cast(target.schema)  # fmt: skip
        written = fragments.write_rows(rows, target.uri, target.schema, target.storage_options)
        node = _node_id()
        offset = 0
        for descriptor in written:
            key = secrets.randbits(62)
            count = fragments.physical_rows(descriptor)
            keys[ok[offset : offset + count]] = key
            offset += count
            extra.append(
                {"status": "fragment", "fragment_key": key, "fragment": descriptor,
                 "count": count, "node": node}
            )  # fmt: skip
        extra[-1]["write_s"] = time.perf_counter() - start
    small = {name: out[name] for name in DESCRIPTOR_SCHEMA.names if name in out.column_names}
    small["fragment_key"] = pa.array(np.where(status == "ok", keys, 0), pa.int64())
    block = pa.table(small)
    for name in DESCRIPTOR_SCHEMA.names:
        if name not in block.column_names:
            block = block.append_column(name, pa.nulls(n, DESCRIPTOR_SCHEMA.field(name).type))
    block = block.select(DESCRIPTOR_SCHEMA.names).cast(DESCRIPTOR_SCHEMA)
    if not extra:
        return block
    return pa.concat_tables([block, pa.Table.from_pylist(extra, schema=DESCRIPTOR_SCHEMA)])


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
