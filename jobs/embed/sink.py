"""Stage 3 on the driver: commits rows (driver sink) or the workers' fragments (distributed
sink, :mod:`jobs.embed.ledger`), errors, and finished partitions.

Why the distributed sink is exact: a retried task re-emits rows, so a fragment may hold ids
that are already committed or that another fragment holds. The driver decides per row, in
arrival order, exactly as for the driver sink (the writer's committed ids, the ids claimed by
rows not yet committed, and key claims across partitions), and then per fragment: all rows
kept -> committed as written; none kept -> never committed (its file is an orphan for gc);
some kept -> those rows (by position in the file) are written as a new fragment on the driver
and that one is committed. So no committed version ever holds an id twice, whatever was killed
when, and a partition is recorded as finished only after every kept row of it is committed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cachebind.config import Settings
from cachebind.sources import Partition
from cachebind.store import CacheWriter, fragments
from jobs.embed.decode import STAGE_SCHEMA, duplicate_id
from jobs.embed.fragments import image_rows
from jobs.embed.ledger import FragmentLedger
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
        self.views = settings.embed.views
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
        self.ledger: FragmentLedger | None = (
            FragmentLedger() if settings.embed.sink == "workers" else None
        )
        self.bytes_received = 0
        """Bytes of the blocks the driver received (Arrow buffers)."""

    def take(self, block: pa.Table) -> int:
        """Buffer one block; returns the number of samples (rows + errors) in it."""
        self.bytes_received += block.nbytes
        status = block["status"].to_numpy(zero_copy_only=False)
        positions = None
        if self.ledger is not None:
            self.write.busy_s += float(pc_sum(block["write_s"]))
            block, status, positions = self.ledger.take(block, status)
        shards = block["shard"].to_pylist()
        ids = block["id"].to_numpy()
        counts = block["count"].to_numpy()
        nodes = block["node"].to_pylist()
        for i in np.flatnonzero(status == "done"):
            self.states[shards[i]].expected = int(counts[i])
            node = nodes[i] or ""
            self.report.partitions_by_node[node] = self.report.partitions_by_node.get(node, 0) + 1
        samples = np.flatnonzero(status != "done")
        for i in samples:
            self.states[shards[i]].received.add(int(ids[i]))
        keep = self._claim_keys(block, status)
        if not keep.all():
            block, status = block.filter(pa.array(keep)), status[keep]
            positions = positions[keep] if positions is not None else None
        ok = status == "ok"
        if ok.any():
            rows = block.filter(pa.array(ok))
            if self.ledger is not None and positions is not None:
                self.ledger.keep(rows, positions[ok])
            else:
                self.rows.append(
                    image_rows(
                        rows, self.vector_dtype.name, self.captions, self.thumbnails, self.views
                    )
                )
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

    def _claim_keys(self, block: pa.Table, status: np.ndarray) -> np.ndarray:
        """Which rows of ``block`` to keep. Gives each key to one sample of the collection: a
        sample whose key another partition already holds becomes a ``duplicate_key`` error
        naming that partition; a sample already held by its own partition is a replay (a
        retried decode task) and is dropped, as the writer would."""
        reasons = block["reason"].to_pylist()
        candidates = [
            int(i) for i in np.flatnonzero(status != "done") if reasons[i] != "duplicate_key"
        ]
        keep = np.ones(block.num_rows, dtype=bool)
        if not candidates:
            return keep
        ids = block["id"].to_numpy()[candidates]
        committed = self.writer.row_ids.contains(ids) | self.writer.error_ids.contains(ids)
        holders = self.writer.holders(ids[committed]) if committed.any() else {}
        shards, keys = block["shard"].to_pylist(), block["key"].to_pylist()
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
        return keep

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
        if self.ledger is not None:
            self._commit_fragments()
        if self.errors:
            errors = pa.concat_tables(self.errors)
            result = self.writer.write_errors(errors)
            self.report.errors_written += result.written
            self.report.rows_skipped += result.skipped
            if result.written:
                self.reasons.update(errors["reason"].to_pylist())
            self._count(errors, "errors", result.written)
        self.report.errors_by_reason = dict(self.reasons)
        self.rows, self.errors = [], []
        waiting = self.ledger.waiting() if self.ledger is not None else {}
        self.pending_rows = len(waiting)
        # Committed now: the writer's id sets answer for them (rows of fragments still waiting
        # for their descriptor stay claimed).
        self.claimed = {sid: shard for sid, shard in self.claimed.items() if sid in waiting}
        # Everything received so far is committed, but for waiting fragments' rows: complete
        # partitions without such rows can be recorded.
        busy = set(waiting.values())
        done = [
            pid
            for pid, s in self.states.items()
            if s.expected is not None and len(s.received) >= s.expected and pid not in busy
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

    def _commit_fragments(self) -> None:
        """Commit the complete fragments in one version: as written, rewritten to their kept
        rows, or not at all (see the module docstring)."""
        assert self.ledger is not None
        descriptors: list[str] = []
        ids: list[int] = []
        shards: list[str] = []
        for frag in self.ledger.ready():
            if len(frag.kept) == frag.count:
                descriptors.append(frag.descriptor)
            elif frag.kept:
                descriptors += fragments.keep_only(
                    self.writer.images_uri,
                    frag.descriptor,
                    sorted(frag.kept),
                    self.writer.schema,
                    self.writer.storage_options,
                )
                self.ledger.rewritten += 1
            else:
                self.ledger.dropped += 1
            ids += [sid for sid, _ in frag.kept.values()]
            shards += [shard for _, shard in frag.kept.values()]
        if not descriptors:
            return
        self.writer.commit_fragments(descriptors, np.asarray(ids, dtype=np.int64))
        self.report.rows_written += len(ids)
        self.write.samples += len(ids)
        for shard, n in Counter(shards).items():
            if shard in self.states:
                self.states[shard].rows += n
        for node, n in self.ledger.take_nodes().items():
            self.report.rows_by_node[node] = self.report.rows_by_node.get(node, 0) + n

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
