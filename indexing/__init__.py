"""indexing: a tuned, verified, versioned FAISS index over the cache's image embeddings.

Three doors::

    import indexing
    from cachebind.store import CacheTable

    table = CacheTable.open(settings.store)
    manifest = indexing.build(table, settings.index)  # a new version, CURRENT
    manifest = indexing.add(table, settings.index)  # rows appended since, a new version
    manifest = indexing.tune(table, settings.index)  # CURRENT re-tuned on today's query sets

each with an optional :class:`BuildOptions` (progress, Ray shards, a forced key, query files).
Behind them, four rooms: :mod:`indexing.mechanics` (FAISS: keys, fitting, parameters, on-disk
lists), :mod:`indexing.quality` (query sets, recall, tuning), :mod:`indexing.steps` (from a
table to a staged version: select, fit, add, tune, write) and :mod:`indexing.versions`
(publishing, retention, the manifest's builder). Loading a version (with the alignment check
against the table) is the reading side's, :mod:`cachebind.published`, re-exported here with
the version-management calls; the store's retention (``collect``, ``protect_published``) and
the query-set helpers the CLI shares (``parse_query_spec``, ``known_query_groups``) are public
too.

The names below are imported on first use, so that a leaf module (``indexing.mechanics.params``
on a bare machine, say) imports without the whole stack (autofaiss, LanceDB, Ray).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachebind.published.layout import current_version, list_versions
    from cachebind.published.load import LoadedIndex, load_current, load_version
    from cachebind.published.manifest import (
        check_alignment,
        ids_checksum,
        recall_for,
        search_params_for,
    )
    from cachebind.published.querylog import QueryLog
    from indexing.quality.gapsets import known_query_groups
    from indexing.quality.querysets import parse_query_spec
    from indexing.steps.add import add
    from indexing.steps.build import build
    from indexing.steps.options import BuildOptions
    from indexing.steps.retune import tune
    from indexing.versions.publishing import (
        prune,
        publish,
        set_current,
        verify_version,
    )
    from indexing.versions.retention import collect, protect_published

_HOME = {
    "build": "indexing.steps.build",
    "add": "indexing.steps.add",
    "tune": "indexing.steps.retune",
    "BuildOptions": "indexing.steps.options",
    "LoadedIndex": "cachebind.published.load",
    "load_current": "cachebind.published.load",
    "load_version": "cachebind.published.load",
    "check_alignment": "cachebind.published.manifest",
    "ids_checksum": "cachebind.published.manifest",
    "recall_for": "cachebind.published.manifest",
    "search_params_for": "cachebind.published.manifest",
    "QueryLog": "cachebind.published.querylog",
    "current_version": "cachebind.published.layout",
    "list_versions": "cachebind.published.layout",
    "prune": "indexing.versions.publishing",
    "publish": "indexing.versions.publishing",
    "set_current": "indexing.versions.publishing",
    "verify_version": "indexing.versions.publishing",
    "collect": "indexing.versions.retention",
    "protect_published": "indexing.versions.retention",
    "parse_query_spec": "indexing.quality.querysets",
    "known_query_groups": "indexing.quality.gapsets",
}
"""Where each public name lives: the doors and their options in :mod:`indexing.steps`; the
reading side (manifest, layout, loading, the query log) in :mod:`cachebind.published`, below
both this package and the runtime."""

__all__ = [
    "BuildOptions",
    "LoadedIndex",
    "QueryLog",
    "add",
    "build",
    "check_alignment",
    "collect",
    "current_version",
    "ids_checksum",
    "known_query_groups",
    "list_versions",
    "load_current",
    "load_version",
    "parse_query_spec",
    "protect_published",
    "prune",
    "publish",
    "recall_for",
    "search_params_for",
    "set_current",
    "tune",
    "verify_version",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'indexing' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
