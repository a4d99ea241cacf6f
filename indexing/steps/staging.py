"""Write a version's files and manifest into a staging directory (only
:func:`indexing.versions.publishing.publish` moves it into ``versions/``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import autofaiss
import faiss
import numpy as np

from cachebind.config import IndexConfig
from cachebind.published.manifest import Manifest, write_manifest
from cachebind.store import CacheTable
from indexing.mechanics.ondisk import storage_of
from indexing.mechanics.ondisk import write_index as write_version_index
from indexing.quality.measure import worst_trusted
from indexing.quality.tune import TuneResult
from indexing.versions.manifest import build_manifest, table_identity
from indexing.versions.publishing import (
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    file_digests,
    new_staging_dir,
)

StageHook = Callable[[str], None]
"""Called with a stage name ("trained", "added", "tuned", "index_written"; a sharded on-disk
merge also "shards_written") as a build passes it."""


def target_of(config: IndexConfig, result: TuneResult | None) -> dict[str, Any]:
    return {
        "recall_k": config.recall_k,
        "recall": config.recall_target,
        "met": result.target_met if result else None,
        "latency_budget_ms": config.latency_budget_ms,
        "latency_met": result.latency_met if result else None,
    }


def write_staged(
    table: CacheTable,
    index: faiss.Index,
    ids: np.ndarray,
    staged: Path | None,
    cfg: IndexConfig,
    *,
    selection: dict[str, Any],
    result: TuneResult | None,
    sets: list[dict[str, Any]],
    latency: dict[str, Any],
    timings: dict[str, float],
    extra: dict[str, Any],
    selection_reason: str | None,
    by_modality: dict[str, dict[str, int]] | None = None,
    on_stage: StageHook | None = None,
) -> Path:
    """Write index, ids and manifest into ``staged`` (a new staging directory if None)."""
    staged = staged if staged is not None else new_staging_dir(cfg.dir)
    try:
        write_version_index(index, staged / INDEX_FILE)
        np.save(staged / IDS_FILE, ids.astype(np.int64))
        if on_stage:
            on_stage("index_written")
        # What loading puts in RAM; an on-disk index's codes (storage.ivfdata_bytes) are paged
        # in from its memory-mapped file as searches touch them.
        memory = (staged / INDEX_FILE).stat().st_size + (staged / IDS_FILE).stat().st_size
        storage = storage_of(index, staged) | extra.get("storage", {})
        built = build_manifest(
            key=selection["key"],
            dim=int(index.d),
            ntotal=int(index.ntotal),
            search_params=result.params if result else {},
            selection=selection,
            target=target_of(cfg, result),
            query_sets=sets,
            headline=worst_trusted(sets, cfg.recall_k),
            latency=latency,
            memory_bytes=memory,
            timings=timings,
            table=table_identity(table, ids),
            software={"faiss": faiss.__version__, "autofaiss": autofaiss.__version__},
            trials=[t.__dict__ for t in result.trials] if result else [],
            selection_reason=selection_reason,
            search_params_by_modality=by_modality,
        )
        # The lineage fields (parent_version, shards, added_rows, update) of this build.
        lineage = {k: v for k, v in extra.items() if k != "storage"}
        write_manifest_files(staged, replace(built, storage=storage, **lineage))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def write_manifest_files(staged: Path, manifest: Manifest) -> None:
    """Record the checksums of the version's files and write its manifest."""
    # (`cachebind index verify`: an index that loads but has a flipped bit returns wrong
    # neighbours without any error.)
    files = [INDEX_FILE, IDS_FILE, *manifest.data_files]
    write_manifest(staged / MANIFEST_FILE, replace(manifest, files=file_digests(staged, files)))
