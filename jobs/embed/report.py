"""What a run did: per-stage throughput, rows, errors by reason; printed and saved as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cachebind.config import StoreConfig
from cachebind.storage import StorageOptions


@dataclass
class StageStats:
    samples: int = 0
    busy_s: float = 0.0
    """Seconds that workers of this stage spent on these samples (summed over workers)."""

    def as_dict(self, wall_s: float) -> dict[str, float]:
        return {
            "samples": self.samples,
            "busy_s": round(self.busy_s, 3),
            "samples_per_busy_s": round(self.samples / self.busy_s, 2) if self.busy_s else 0.0,
            "samples_per_wall_s": round(self.samples / wall_s, 2) if wall_s else 0.0,
        }


@dataclass
class EmbedReport:
    """What a run did; printed at the end and saved as JSON beside the table."""

    source: str
    uri: str
    table: str
    encoder: dict[str, Any]
    rows_written: int = 0
    rows_skipped: int = 0
    """Samples already in the table or errors table (earlier runs, repeated keys)."""
    errors_written: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    non_samples: int = 0
    """Files of the source that are no sample by design (a folder's ``.txt`` / ``.json``
    sidecars), counted over the whole listing: on a first run, files = rows + errors + this."""
    partitions_total: int = 0
    partitions_skipped: int = 0
    partitions_finished: int = 0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    samples_per_s: float = 0.0
    steady_samples_per_s: float = 0.0
    """Throughput once the pipeline is flowing (first block to last): excludes Ray start-up,
    actor and model initialisation, which a long job amortises. 0 when the job was too short
    to measure it."""
    stopped_by_limit: bool = False
    sink: str = ""
    """``workers`` (the distributed sink) or ``driver`` (``embed.sink``)."""
    nodes: int = 0
    """Alive Ray nodes when the job started (checked to see a local table location)."""
    partitions_by_node: dict[str, int] = field(default_factory=dict)
    """Partitions read per Ray node id of the decode task that read them (a partition read
    again after a lost task counts again)."""
    rows_by_node: dict[str, int] = field(default_factory=dict)
    """Rows committed per Ray node id of the actor that wrote them (distributed sink)."""
    driver_bytes_received: int = 0
    """Bytes of the pipeline's output blocks that reached the driver."""
    fragments: dict[str, int] = field(default_factory=dict)
    """Workers' fragments committed as written, rewritten to their new rows, or dropped."""
    gc: dict[str, Any] = field(default_factory=dict)
    """What the collection after the job removed (:mod:`cachebind.store.gc`)."""
    started_at: str = ""
    finished_at: str = ""
    report_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_reason.items())) or "-"
        stage_lines = "\n".join(
            f"  {name:<7} {s['samples']:>9} samples  {s['samples_per_busy_s']:>9.1f}/s per "
            f"worker  {s['samples_per_wall_s']:>9.1f}/s overall"
            for name, s in self.stages.items()
        )
        return (
            f"embed {self.source} -> {self.uri}/{self.table}\n"
            f"  rows written {self.rows_written}, skipped (already present) {self.rows_skipped}, "
            f"errors {self.errors_written} ({errors})"
            + (f", sidecar files {self.non_samples}" if self.non_samples else "")
            + "\n"
            f"  partitions {self.partitions_finished} finished, {self.partitions_skipped} "
            f"skipped as done, of {self.partitions_total}\n"
            f"{stage_lines}\n"
            f"  wall {self.wall_s:.1f} s, {self.samples_per_s:.1f} samples/s"
            + (
                f" ({self.steady_samples_per_s:.1f}/s once flowing)"
                if self.steady_samples_per_s
                else " (too short to measure a steady rate)"
            )
            + (" (stopped at --limit)" if self.stopped_by_limit else "")
        )


def save_report(report: EmbedReport, store: StoreConfig) -> str:
    """Write ``<uri>/<table>.report.json`` (latest) and ``<uri>/_reports/<table>-<time>.json``
    beside the table, wherever it lives (a local folder or an object store)."""
    text = json.dumps(report.to_dict(), indent=2, default=str)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = store.uri.rstrip("/")
    latest = f"{root}/{store.table}.report.json"
    storage = StorageOptions.from_s3(store.s3)
    fs, reports = storage.url_to_fs(f"{root}/_reports")
    fs.makedirs(reports, exist_ok=True)
    for path in (f"{root}/_reports/{store.table}-{stamp}.json", latest):
        with storage.open(path, "w") as f:
            f.write(text)
    return latest
