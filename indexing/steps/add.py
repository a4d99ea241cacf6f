"""Incremental add: appended table rows join the current version without retraining."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss

from cachebind.config import IndexConfig
from cachebind.errors import IndexMismatchError
from cachebind.published.gpu import gpu_memory_bytes, gpu_wanted
from cachebind.published.layout import INDEX_FILE, current_version, versions_dir
from cachebind.published.manifest import ids_checksum, read_manifest
from cachebind.store import CacheTable
from indexing.mechanics.ondisk import CopyOnWriteAdd
from indexing.steps.build import build_index, finish
from indexing.steps.options import BuildOptions
from indexing.steps.prepare import prepare_work
from indexing.steps.rows import add_range
from indexing.steps.select import outgrown, select_for
from indexing.versions.publishing import new_staging_dir, publish
from indexing.versions.retention import pinned

log = logging.getLogger(__name__)


def add(
    table: CacheTable, config: IndexConfig, options: BuildOptions | None = None
) -> dict[str, Any]:
    """Add the rows appended to ``table`` since the current version of ``config.dir``, without
    refitting (``cachebind index add``). Returns the published manifest (JSON).

    The current version's rows must be a prefix of the table (same ids in the same order, by
    checksum); otherwise the table was rewritten, not appended to, and IndexMismatchError says
    to rebuild. The result is published as a new version whose manifest names its parent;
    search parameters are re-tuned and recall re-measured on the grown index, on every query
    set a build uses (held-out rows, captions, the query log, ``options.query_files``).

    When the grown table has outgrown the current index (:func:`indexing.steps.select.outgrown`:
    a Flat index past the exact-search size, an IVF sized for a sixteenth of the rows, a key
    that no longer fits the memory budget), a full build replaces it instead, unless
    ``config.rebuild_when_outgrown`` is off; the manifest's ``update`` says which happened and
    why (``{"mode": "added" | "rebuilt", "reason": ...}``). ``options.shards`` and
    ``ray_address`` are used by such a rebuild (a sharded Ray build, as :func:`indexing.build`).
    """
    # The table version being read is tagged while this runs: a gc meanwhile keeps it.
    with pinned(table):
        return _add(table, config, options or BuildOptions())


def _add(table: CacheTable, config: IndexConfig, options: BuildOptions) -> dict[str, Any]:
    progress, on_stage = options.progress, options.on_stage
    index_dir = Path(config.dir)
    parent = current_version(index_dir)
    if parent is None:
        raise FileNotFoundError(f"no published index in {index_dir}: build one first")
    old = read_manifest(index_dir, parent)
    folder = versions_dir(index_dir) / parent
    n_old = old.table.row_count
    table_ids = table.ids()
    if len(table_ids) < n_old or ids_checksum(table_ids[:n_old]) != old.table.ids_sha256:
        raise IndexMismatchError(
            f"the table (version {table.version}, {len(table_ids)} rows) does not extend the rows "
            f"index {parent} was built from ({n_old} rows, table version "
            f"{old.table.version}): rows were changed or removed, rebuild the index"
        )
    lineage: dict[str, Any] = {"parent_version": parent, "added_rows": int(len(table_ids) - n_old)}
    gpu_seen = gpu_wanted(config.use_gpu) and gpu_memory_bytes() is not None
    reason = outgrown(
        old.selection, select_for(len(table_ids), table.dim, config), gpu_seen=gpu_seen
    )
    if reason is not None and config.rebuild_when_outgrown:
        log.info("rebuilding instead of adding: %s", reason)
        # A rebuild selects its own key: what the caller forces is a build's choice.
        rebuild = replace(options, index_key=None, escalate_forced=False, queries=None)
        staged = build_index(
            table,
            config,
            rebuild,
            lineage=lineage | {"update": {"mode": "rebuilt", "reason": reason}},
        )
        version = publish(index_dir, staged, config.keep_versions)
        return read_manifest(index_dir, version).to_json()
    if reason is not None:
        log.warning("adding to an outgrown index (rebuild_when_outgrown is off): %s", reason)
    work = prepare_work(table, config, None, options.query_files)
    # An on-disk version grows copy-on-write: new rows in memory, then merged with the parent's
    # lists into the new version's own ivfdata (indexing/mechanics/ondisk.py).
    grow = CopyOnWriteAdd(folder, old.storage, n_old) if old.on_disk else None
    index = grow.adder if grow else faiss.read_index(str(folder / INDEX_FILE))
    t0 = time.perf_counter()
    ids = add_range(
        index,
        table.dataset,
        0,
        work.n,
        work.exact,
        add_from=n_old,
        progress=progress,
        column=table.column,
    )
    work.timings["add_s"] = time.perf_counter() - t0
    if on_stage:
        on_stage("added")
    into = None
    if grow is not None:
        into = new_staging_dir(index_dir)
        index = grow.merge(into)
    update = {
        "mode": "added",
        "reason": f"added although outgrown (rebuild_when_outgrown is off): {reason}"
        if reason
        else "the index still suits the grown table",
    }
    staged = finish(
        work,
        index,
        ids,
        old.selection,
        progress=progress,
        on_stage=on_stage,
        extra=lineage | {"shards": 1, "update": update},
        staged=into,
        may_escalate=old.selection.get("reason") != "forced by the caller",
    )
    version = publish(index_dir, staged, config.keep_versions)
    return read_manifest(index_dir, version).to_json()
