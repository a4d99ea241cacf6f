"""Bounded disk: remove table versions nobody needs any more, and orphan data files.

Every commit makes a Lance version, and a version keeps its data files: after a job compacts
its many small fragments the table directory holds the data twice (the fragments, still
referenced by the old versions, and the compacted files). :func:`collect_store` removes the
versions of the images, errors and progress tables that are older than ``retention_s`` and not
tagged (a published index version tags the table version it was built from,
:mod:`indexing.versions.retention`); Lance never removes the latest version or a tagged one. With
``orphans`` it also removes data files no version references (fragments written by workers
whose descriptors were never committed): only safe while no job writes to the table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from cachebind.config import StoreConfig
from cachebind.storage import StorageOptions, lance_options
from cachebind.store.writer import progress_table_name


@dataclass
class TableGc:
    versions_removed: int = 0
    files_removed: int = 0
    bytes_freed: int = 0
    versions_kept: list[int] = field(default_factory=list)
    tagged: list[int] = field(default_factory=list)
    disk_bytes: int = 0
    """Bytes under the table's directory after the collection."""
    live_bytes: int = 0
    """Bytes of the data files the latest version references."""


@dataclass
class GcReport:
    retention_s: float
    orphans: bool
    tables: dict[str, TableGc] = field(default_factory=dict)

    @property
    def bytes_freed(self) -> int:
        return sum(t.bytes_freed for t in self.tables.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_freed": self.bytes_freed}

    def summary(self) -> str:
        lines = [
            f"gc (retention {self.retention_s:g} s{', orphans' if self.orphans else ''}): "
            f"{_mb(self.bytes_freed)} freed"
        ]
        for name, t in self.tables.items():
            lines.append(
                f"  {name}: {t.versions_removed} versions, {t.files_removed} files, "
                f"{_mb(t.bytes_freed)} removed; kept versions {t.versions_kept} "
                f"(tagged {t.tagged}); {_mb(t.disk_bytes)} on disk for {_mb(t.live_bytes)} live"
            )
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def table_uri(config: StoreConfig, name: str) -> str:
    return f"{config.uri.rstrip('/')}/{name}.lance"


def collect_table(
    uri: str, retention_s: float, orphans: bool, storage_options: dict[str, str] | None
) -> TableGc:
    """Clean one dataset; see the module docstring."""
    import lance

    dataset = lance.dataset(uri, storage_options=storage_options)
    stats = dataset.cleanup_old_versions(
        older_than=timedelta(seconds=retention_s),
        delete_unverified=orphans,
        error_if_tagged_old_versions=False,  # tagged versions are kept, silently
    )
    dataset = lance.dataset(uri, storage_options=storage_options)
    files = [f for frag in dataset.get_fragments() for f in frag.metadata.files]
    return TableGc(
        versions_removed=int(stats.old_versions),
        files_removed=int(stats.data_files_removed),
        bytes_freed=int(stats.bytes_removed),
        versions_kept=[int(v["version"]) for v in dataset.versions()],
        tagged=sorted({int(t["version"]) for t in dataset.tags.list().values()}),
        live_bytes=sum(int(f.file_size_bytes or 0) for f in files),
    )


def disk_bytes(uri: str, storage: StorageOptions) -> int:
    fs, path = storage.url_to_fs(uri)
    return int(fs.du(path, total=True)) if fs.exists(path) else 0


def collect_store(config: StoreConfig, retention_s: float, orphans: bool = False) -> GcReport:
    """Clean the images, errors and progress tables of ``config`` (those that exist)."""
    report = GcReport(retention_s=retention_s, orphans=orphans)
    options = lance_options(config.uri, config.s3)
    storage = StorageOptions.from_s3(config.s3)
    for name in (config.table, config.errors_table_name, progress_table_name(config.table)):
        uri = table_uri(config, name)
        if not disk_bytes(uri, storage):
            continue
        result = collect_table(uri, retention_s, orphans, options)
        result.disk_bytes = disk_bytes(uri, storage)
        report.tables[name] = result
    return report
