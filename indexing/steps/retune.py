"""``cachebind index tune``: re-tune the current version's search parameters on today's queries.

The index files do not change, only which ``nprobe`` / ``k_factor`` / ``efSearch`` to search
them with, so no rebuild: the new version's ``index.faiss``, ``ids.npy`` (and ``index.ivfdata``)
are hard links to the parent's (copies when the file system refuses links), and its manifest is
the parent's with the tuned and measured fields replaced and ``update.mode == "retuned"``. It is
published like any build (staging directory renamed into ``versions/``, CURRENT replaced
atomically), so a serving runtime polling CURRENT moves to it between two requests. Pruning the
parent later removes only the parent's names for the shared files.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss

from cachebind.config import IndexConfig
from cachebind.published.faissio import read_index
from cachebind.published.layout import (
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    current_version,
    versions_dir,
)
from cachebind.published.manifest import (
    check_alignment,
    read_manifest,
    recall_by_modality,
    write_manifest,
)
from cachebind.store import CacheTable
from indexing.mechanics.fit import search_fn
from indexing.quality.bymodality import tune_and_measure
from indexing.quality.measure import groups_of, worst_trusted
from indexing.quality.querysets import deciding
from indexing.quality.recall import drop_self
from indexing.quality.tune import measure_latency
from indexing.steps.escalate import tune_index
from indexing.steps.options import BuildOptions
from indexing.steps.prepare import prepare_work
from indexing.steps.rows import add_range
from indexing.steps.staging import target_of
from indexing.versions.manifest import build_times, headline_fields, now
from indexing.versions.publishing import new_staging_dir, publish

log = logging.getLogger(__name__)


def share_file(src: Path, dst: Path) -> str:
    """Hard-link ``src`` as ``dst`` (``"link"``), or copy it across file systems (``"copy"``)."""
    try:
        os.link(src, dst)
        return "link"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copy2(src, dst)
        return "copy"


def tune(
    table: CacheTable, config: IndexConfig, options: BuildOptions | None = None
) -> dict[str, Any]:
    """Publish ``config.dir``'s CURRENT re-tuned on the latest query sets (log, captions,
    ``options.query_files``, held-out rows), without rebuilding (``cachebind index tune``).

    The table must be the one CURRENT was built from (IndexMismatchError otherwise: rows added
    since want ``index add``). Returns the new version's manifest. When no setting reaches the
    target, the version still records what was measured (``target.met`` False) and a warning
    says to rebuild, which may escalate to a stronger key (``index build``).
    """
    options = options or BuildOptions()
    progress = options.progress
    index_dir = Path(config.dir)
    parent = current_version(index_dir)
    if parent is None:
        raise FileNotFoundError(f"no published index in {index_dir}: build one first")
    old = read_manifest(index_dir, parent)
    folder = versions_dir(index_dir) / parent
    check_alignment(old, table, table.ids())
    t0 = time.perf_counter()
    work = prepare_work(table, config, None, options.query_files)
    index = read_index(folder, old.storage)
    # Ground truth needs one pass over the table; the index itself is only searched.
    add_range(None, table.dataset, 0, work.n, work.exact, progress=progress, column=table.column)
    work.timings["prepare_s"] = time.perf_counter() - t0
    truth = drop_self(work.exact.positions, work.query_positions, work.exact.k - 1)
    groups = groups_of(work.sets, deciding(work.sets))
    t0 = time.perf_counter()
    tuned = tune_index(work, index, old.selection, truth, groups, progress)
    work.timings["tune_s"] = time.perf_counter() - t0
    result = tuned.result
    if not tuned.reached(config.recall_target):
        log.warning(
            "%s cannot reach recall@%d %.3f on every trusted query set by its search "
            "parameters alone: `cachebind index build` may escalate to a stronger key",
            old.index_key,
            config.recall_k,
            config.recall_target,
        )
    t0 = time.perf_counter()
    by_modality, sets = tune_and_measure(work, index, result, groups, truth, progress=progress)
    search = search_fn(index)
    probes = work.queries if len(work.queries) else None
    latency = (
        measure_latency(search, probes, config.recall_k, progress=progress)
        if probes is not None
        else old.latency_ms
    )
    work.timings["measure_s"] = time.perf_counter() - t0
    del index  # unmap an on-disk index's ivfdata before the version folder moves on
    headline = worst_trusted(sets, config.recall_k)

    staged = new_staging_dir(index_dir)
    try:
        names = [INDEX_FILE, IDS_FILE, *old.data_files]
        how = {name: share_file(folder / name, staged / name) for name in names}
        manifest = replace(
            old,
            version=None,
            created_at=now(),
            search_params=result.params if result else {},
            search_params_by_modality=by_modality,
            target=target_of(config, result),
            **headline_fields(headline),
            query_sets=sets,
            recall_by_modality=recall_by_modality(sets),
            latency_ms=latency,
            build_time_s=build_times(work.timings),
            software=old.software | {"faiss": faiss.__version__},
            tuning_trials=[t.__dict__ for t in result.trials] if result else [],
            parent_version=parent,
            added_rows=None,
            update={
                "mode": "retuned",
                "reason": f"search parameters re-tuned on {len(work.sets)} query sets; "
                f"index files shared with {parent} ("
                + ", ".join(f"{n}: {h}" for n, h in how.items())
                + ")",
                "previous_search_params": old.search_params,
            },
            # Same bytes as the parent's: its recorded sizes and digests still hold.
            files={n: old.files[n] for n in names} if old.files else {},
        )
        write_manifest(staged / MANIFEST_FILE, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    version = publish(index_dir, staged, config.keep_versions)
    return read_manifest(index_dir, version).to_json()
