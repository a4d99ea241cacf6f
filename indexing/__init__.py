"""indexing: a tuned, verified, versioned FAISS index over the cache's image embeddings.

select (autofaiss key under a memory budget) -> tune (recall target on held-out queries) ->
build (single, or sharded on Ray) -> manifest -> publish (versions + atomic CURRENT). Loading
(with the alignment check against the table) is the reading side's,
:mod:`cachebind.published.load`, re-exported here.

The names below are imported on first use, so that a leaf module (``indexing.mechanics.params`` on a
bare machine, say) imports without the whole stack (autofaiss, LanceDB, Ray).
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
    from indexing.steps.add import add_rows
    from indexing.steps.build import build_and_publish, build_index
    from indexing.steps.retune import tune_current
    from indexing.steps.select import Selection, select_index
    from indexing.versions.publishing import (
        prune,
        publish,
        set_current,
        verify_version,
    )

_HOME = {
    "add_rows": "indexing.steps.add",
    "build_and_publish": "indexing.steps.build",
    "build_index": "indexing.steps.build",
    "LoadedIndex": "cachebind.published.load",
    "load_current": "cachebind.published.load",
    "load_version": "cachebind.published.load",
    "check_alignment": "cachebind.published.manifest",
    "ids_checksum": "cachebind.published.manifest",
    "recall_for": "cachebind.published.manifest",
    "search_params_for": "cachebind.published.manifest",
    "QueryLog": "cachebind.published.querylog",
    "tune_current": "indexing.steps.retune",
    "Selection": "indexing.steps.select",
    "select_index": "indexing.steps.select",
    "current_version": "cachebind.published.layout",
    "list_versions": "cachebind.published.layout",
    "prune": "indexing.versions.publishing",
    "publish": "indexing.versions.publishing",
    "set_current": "indexing.versions.publishing",
    "verify_version": "indexing.versions.publishing",
}
"""Where each public name lives: the reading side (manifest, layout, loading, the query log)
is :mod:`cachebind.published`, below both this package and the runtime."""

__all__ = [
    "LoadedIndex",
    "QueryLog",
    "Selection",
    "add_rows",
    "build_and_publish",
    "build_index",
    "check_alignment",
    "current_version",
    "ids_checksum",
    "list_versions",
    "load_current",
    "load_version",
    "prune",
    "publish",
    "recall_for",
    "search_params_for",
    "select_index",
    "set_current",
    "tune_current",
    "verify_version",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'indexing' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
