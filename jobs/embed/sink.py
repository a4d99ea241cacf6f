"""Stage 3, the writer on the driver: commits rows and errors, and finished partitions."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cachebind.config import Settings
from cachebind.sources import Partition
from cachebind.store import CacheWriter
from jobs.embed.decode import STAGE_SCHEMA, duplicate_id
from jobs.embed.report import EmbedReport, StageStats

ERROR_COLUMNS = pa.schema(
    [STAGE_SCHEMA.field(n) for n in ("id", "key", "shard", "stage", "reason", "detail")]
)


@dataclass
class PartitionState:
    received: set[int] = field(default_factory=set)
    expected: int | None = None
    rows: int = 0
    errors: int = 0


class Sink:
    """The driver's side: buffers the pipeline's output and commits it through the writer."""

    def __init__(
        self,
        writer: CacheWriter,
        settings: Settings,
        report: EmbedReport,
        states: dict[str, PartitionState],
        partitions: dict[str, Partition],
    ) -> None:
        self.writer = writer
        self.report = report
        self.states = states
        self.partitions = partitions
        self.vector_dtype = np.dtype(settings.store.vector_dtype)
        self.captions = settings.embed.caption_embeddings
        self.thumbnails = settings.embed.thumbnails
        self.rows: list[pa.Table] = []
        self.errors: list[pa.Table] = []
        self.pending_rows = 0
        self.last_samples = 0
        self.decode = StageStats()
        self.encode = StageStats()
        self.write = StageStats()
        self.reasons: Counter[str] = Counter()
        self.claimed: dict[int, str] = {}
        """Ids of buffered (not yet committed) samples -> their partition."""

    def take(self, block: pa.Table) -> int:
        """Buffer one block; returns the number of samples (rows + errors) in it."""
        status = block["status"].to_numpy(zero_copy_only=False)
        shards = block["shard"].to_pylist()
        ids = block["id"].to_numpy()
        counts = block["count"].to_numpy()
        for i in np.flatnonzero(status == "done"):
            self.states[shards[i]].expected = int(counts[i])
        samples = np.flatnonzero(status != "done")
        for i in samples:
            self.states[shards[i]].received.add(int(ids[i]))
        block, status = self._claim_keys(block, status)
        ok = status == "ok"
        if ok.any():
            rows = block.filter(pa.array(ok))
            self.rows.append(self._image_rows(rows))
            self.pending_rows += rows.num_rows
            self.decode.samples += rows.num_rows
            self.decode.busy_s += float(pc_sum(rows["decode_s"]))
            self.encode.samples += rows.num_rows
            self.encode.busy_s += float(pc_sum(rows["encode_s"]))
        bad = status == "error"
        if bad.any():
            self.errors.append(
                block.filter(pa.array(bad)).select(ERROR_COLUMNS.names).cast(ERROR_COLUMNS)
            )
        self.last_samples = len(samples)
        return len(samples)

    def _claim_keys(self, block: pa.Table, status: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """Give each key to one sample of the collection: a sample whose key another
        partition already holds becomes a ``duplicate_key`` error naming that partition; a
        sample already held by its own partition is a replay (a retried decode task) and is
        dropped, as the writer would."""
        reasons = block["reason"].to_pylist()
        candidates = [
            int(i) for i in np.flatnonzero(status != "done") if reasons[i] != "duplicate_key"
        ]
        if not candidates:
            return block, status
        ids = block["id"].to_numpy()[candidates]
        committed = self.writer.row_ids.contains(ids) | self.writer.error_ids.contains(ids)
        holders = self.writer.holders(ids[committed]) if committed.any() else {}
        shards, keys = block["shard"].to_pylist(), block["key"].to_pylist()
        keep = np.ones(block.num_rows, dtype=bool)
        duplicates: list[dict[str, Any]] = []
        for i, sid in zip(candidates, ids.tolist(), strict=True):
            holder = self.claimed.get(sid) or holders.get(sid, (None, ""))[0]
            if holder is None:
                self.claimed[sid] = shards[i]
                continue
            keep[i] = False
            if holder == shards[i]:
                self.report.rows_skipped += 1
                continue
            where = " (in the errors table)" if holders.get(sid, ("", ""))[1] == "errors" else ""
            duplicates.append(
                {
                    "id": duplicate_id(keys[i], shards[i]),
                    "key": keys[i],
                    "shard": shards[i],
                    "stage": "read",
                    "reason": "duplicate_key",
                    "detail": f"key {keys[i]!r} is already taken by a sample of {holder}"
                    f"{where}, which is kept",
                }
            )
        if duplicates:
            self.errors.append(pa.Table.from_pylist(duplicates, schema=ERROR_COLUMNS))
        if keep.all():
            return block, status
        return block.filter(pa.array(keep)), status[keep]

    def _image_rows(self, rows: pa.Table) -> pa.Table:
        columns: dict[str, Any] = {
            name: rows[name] for name in ("id", "key", "caption", "url", "width", "height", "shard")
        }
        columns["vector"] = _as_dtype(rows["vector"], self.vector_dtype)
        if self.captions:
            columns["text_vector"] = _as_dtype(rows["text_vector"], self.vector_dtype)
        if self.thumbnails:
            columns["thumbnail"] = rows["thumbnail"]
        return pa.table(columns)

    def flush(self) -> None:
        """Commit buffered rows and errors, then record partitions that are now complete."""
        start = time.perf_counter()
        if self.rows:
            rows = pa.concat_tables(self.rows)
            result = self.writer.write_rows(rows)
            self.report.rows_written += result.written
            self.report.rows_skipped += result.skipped
            self.write.samples += rows.num_rows
            self._count(rows, "rows", result.written)
        if self.errors:
            errors = pa.concat_tables(self.errors)
            result = self.writer.write_errors(errors)
            self.report.errors_written += result.written
            self.report.rows_skipped += result.skipped
            if result.written:
                self.reasons.update(errors["reason"].to_pylist())
            self._count(errors, "errors", result.written)
        self.report.errors_by_reason = dict(self.reasons)
        self.rows, self.errors, self.pending_rows = [], [], 0
        self.claimed.clear()  # committed now: the writer's id sets answer for them
        # Everything received so far is committed: complete partitions can be recorded.
        done = [
            pid
            for pid, s in self.states.items()
            if s.expected is not None and len(s.received) >= s.expected
        ]
        if done:
            self.writer.finish_partitions(
                [
                    {
                        "partition": pid,
                        "fingerprint": self.partitions[pid].fingerprint(),
                        "source": self.report.source,
                        "rows": self.states[pid].rows,
                        "errors": self.states[pid].errors,
                    }
                    for pid in done
                ]
            )
            for pid in done:
                del self.states[pid]
            self.report.partitions_finished += len(done)
        self.write.busy_s += time.perf_counter() - start

    def _count(self, table: pa.Table, what: str, written: int) -> None:
        if not written:
            return
        for shard, n in Counter(table["shard"].to_pylist()).items():
            if shard in self.states:
                setattr(self.states[shard], what, getattr(self.states[shard], what) + n)


def pc_sum(column: pa.ChunkedArray) -> float:
    import pyarrow.compute as pc

    value = pc.sum(column).as_py()
    return float(value or 0.0)


def _as_dtype(column: pa.ChunkedArray, dtype: np.dtype) -> pa.FixedSizeListArray:
    """A vector column in the table's dtype, null entries (rows without a caption) kept."""
    column = column.combine_chunks()
    dim = column.type.list_size
    # .values keeps the slots of null entries (flatten would drop them).
    start = column.offset * dim
    values = column.values.slice(start, len(column) * dim)
    values = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    mask = column.is_null() if column.null_count else None
    return pa.FixedSizeListArray.from_arrays(pa.array(values), dim, mask=mask)
