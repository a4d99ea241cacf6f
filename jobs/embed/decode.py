"""Stage 1, the mapper on CPU workers: read a partition, decode and preprocess each sample.

Bad samples become error rows (stage, reason) instead of failing the task. Samples are decoded
in a sandbox worker process (``cachebind.sandbox``, one per decode task, kept for the task's
Ray worker), a chunk at a time: a decoder that crashes natively (a segfault would otherwise
kill the Ray worker, whose retries would fail the partition), passes the sandbox's memory or
CPU cap or its deadline costs the chunk a second pass, one sample per sandbox task, which finds
the culprit; it becomes an error row (``undecodable`` naming the signal, ``too_large``,
``too_slow``) and the others are decoded as usual.

Every sample read ends in exactly one row: a key already used earlier in the partition gets a
``duplicate_key`` error naming the sample that keeps it (across partitions the sink does the
same).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, get_args

import pyarrow as pa

from cachebind.config import ExtraEncoderName, SandboxConfig
from cachebind.errors import InputError
from cachebind.sandbox import Sandbox
from cachebind.sources import Partition, Sample, StorageOptions, read_partition
from cachebind.store import row_id
from jobs.embed.sample import (
    DecodeOptions,
    decode_sample,
    decode_samples,
    empty_row,
    error_row,
    thumbnail_jpeg,
)

PIXELS = (3, 224, 224)

# Columns between the stages. ``status`` is "ok" (pixels to encode), "error" (goes to the errors
# table) or "done" (one marker per partition: ``count`` distinct ids were emitted for it, by a
# task on Ray node ``node``).
STAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("status", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("pixels", pa.binary()),
        pa.field("view_pixels", pa.binary()),  # embed.views > 0: N more tensors like pixels
        # embed.extra_encoders: each one's own preprocessing (cachebind.preprocess.extra)
        *(pa.field(f"pixels_{name}", pa.binary()) for name in get_args(ExtraEncoderName)),
        pa.field("thumbnail", pa.binary()),
        pa.field("count", pa.int64()),
        pa.field("decode_s", pa.float64()),
        pa.field("node", pa.string()),
    ]
)

__all__ = [
    "PIXELS",
    "STAGE_SCHEMA",
    "DecodeOptions",
    "decode_partition",
    "decode_sample",
    "duplicate_id",
    "thumbnail_jpeg",
]

SANDBOX_PRELOAD = (
    "cachebind.preprocess.image",
    "cachebind.preprocess.views",
    "cachebind.preprocess.extra",
    "jobs.embed.sample",
)
_SANDBOXES: dict[str, Sandbox] = {}
"""One sandbox per Ray worker process (and configuration), reused by the tasks it runs."""


def duplicate_id(key: str, shard: str, position: int | None = None) -> int:
    """The errors-table id of a sample whose key was already taken: stable across runs (so a
    resumed job does not record it twice) and distinct from the keeper's ``row_id(key)``."""
    suffix = f":{position}" if position is not None else ""
    return row_id(f"{key}#duplicate@{shard}{suffix}")


def duplicate_row(sid: int, sample: Sample, shard: str, kept_by: str) -> dict[str, Any]:
    detail = f"key {sample.key!r} is already taken by {kept_by}, which is kept"
    base = {"caption": sample.caption, "url": sample.url}
    return error_row(sid, sample.key, shard, "read", "duplicate_key", detail, base)


def decode_partition(batch: pa.Table, *, options: DecodeOptions) -> Iterator[pa.Table]:
    """Read each partition of ``batch`` and yield blocks of decoded samples, then its marker.

    Bad samples become ``error`` rows (reason from ``InputError``) instead of exceptions, so a
    corrupt image never fails the task; ids in the partition's ``skip`` list (committed by an
    earlier run) are not decoded at all.
    """
    for item in batch.to_pylist():
        partition = Partition.from_dict(json.loads(item["partition"]))
        yield from _decode_one(partition, set(json.loads(item["skip"])), options)


def _decode_one(partition: Partition, skip: set[int], options: DecodeOptions) -> Iterator[pa.Table]:
    rows: list[dict[str, Any]] = []
    pending: list[tuple[Sample, int]] = []
    holders: dict[int, int] = {}  # id -> position of the sample that holds the key
    emitted: set[int] = set()
    # Files over the byte budget are refused unread (a sample's too_large), not read and
    # refused by the decoder: a 20 GB "image" must not reach this task's memory.
    samples = iter(
        read_partition(
            partition, options.storage, options.max_bytes, max_group_bytes=options.max_group_bytes
        )
    )
    position = -1
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception as exc:  # an unreadable shard must not stop the job
            for key in _unread_keys(partition, position + 1):
                sid = row_id(key)
                if sid not in emitted and sid not in skip:
                    emitted.add(sid)
                    detail = repr(exc)
                    rows.append(
                        error_row(sid, key, partition.id, "read", "unreadable", detail, None)
                    )
            break
        position += 1
        sid = row_id(sample.key)
        if sid in holders:
            dup = duplicate_id(sample.key, partition.id, position)
            if dup not in skip and dup not in emitted:
                emitted.add(dup)
                kept_by = f"sample {holders[sid]} of {partition.id}"
                rows.append(duplicate_row(dup, sample, partition.id, kept_by))
            continue
        holders[sid] = position
        if sid in skip:
            continue
        emitted.add(sid)
        pending.append((sample, sid))
        if len(pending) >= options.chunk_rows:
            rows += decode_isolated(pending, partition.id, options)
            pending = []
        if len(rows) >= options.chunk_rows:
            yield pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)
            rows = []
    rows += decode_isolated(pending, partition.id, options)
    marker = empty_row(row_id(f"{partition.id}#done"), partition.id)
    rows.append({**marker, "status": "done", "count": len(emitted), "node": _node_id()})
    yield pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)


def _unread_keys(partition: Partition, first: int) -> list[str]:
    """Error keys for the samples a read failure left unread, from position ``first``: one
    per sample where the partition knows its size (a parquet row group cut by a corrupt page
    still accounts for every row), else one for the rest of the shard."""
    total = partition.options.get("num_samples")
    rest = range(first + 1, total) if isinstance(total, int) else range(0)
    return [f"{partition.id}#unreadable", *(f"{partition.id}#unreadable@{i}" for i in rest)]


def decode_isolated(
    pending: list[tuple[Sample, int]], shard: str, options: DecodeOptions
) -> list[dict[str, Any]]:
    """``decode_sample`` of each pending sample, in the sandbox: the chunk in one task, and
    when that task fails (a crash, a cap, the deadline), each sample in a task of its own."""
    if not pending:
        return []
    sandbox = _sandbox(options.sandbox)
    wire = replace(options, storage=StorageOptions())  # the worker reads no object store
    if len(pending) > 1:
        try:
            return sandbox.run(decode_samples, pending, shard, wire, source=shard)
        except InputError:
            pass  # one of them took the worker down: find which
    rows: list[dict[str, Any]] = []
    for sample, sid in pending:
        try:
            rows += sandbox.run(decode_samples, [(sample, sid)], shard, wire, source=sample.key)
        except InputError as exc:
            base = {"caption": sample.caption, "url": sample.url}
            rows.append(error_row(sid, sample.key, shard, "decode", exc.reason, exc.detail, base))
    return rows


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _sandbox(config: SandboxConfig) -> Sandbox:
    key = config.model_dump_json()
    sandbox = _SANDBOXES.get(key)
    if sandbox is None:
        sandbox = _SANDBOXES[key] = Sandbox(config, preload=SANDBOX_PRELOAD)
    return sandbox
