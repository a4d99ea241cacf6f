"""indexing: a tuned, verified, versioned FAISS index over the cache's image embeddings.

select (autofaiss key under a memory budget) -> tune (recall target on held-out queries) ->
build (single, or sharded on Ray) -> manifest -> publish (versions + atomic CURRENT) ->
load (alignment check against the table).

The names below are imported on first use, so that a leaf module (``indexing.gpu`` on a bare
GPU machine, say) imports without the whole stack (autofaiss, LanceDB, Ray).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexing.add import add_rows
    from indexing.build import build_and_publish, build_index
    from indexing.load import LoadedIndex, load_current, load_version
    from indexing.manifest import check_alignment, ids_checksum, recall_for, search_params_for
    from indexing.querylog import QueryLog
    from indexing.retune import tune_current
    from indexing.select import Selection, select_index
    from indexing.versions import (
        current_version,
        list_versions,
        prune,
        publish,
        set_current,
        verify_version,
    )

_HOME = {
    "add_rows": "add",
    "build_and_publish": "build",
    "build_index": "build",
    "LoadedIndex": "load",
    "load_current": "load",
    "load_version": "load",
    "check_alignment": "manifest",
    "ids_checksum": "manifest",
    "recall_for": "manifest",
    "search_params_for": "manifest",
    "QueryLog": "querylog",
    "tune_current": "retune",
    "Selection": "select",
    "select_index": "select",
    "current_version": "versions",
    "list_versions": "versions",
    "prune": "versions",
    "publish": "versions",
    "set_current": "versions",
    "verify_version": "versions",
}

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
    value = getattr(importlib.import_module(f"indexing.{_HOME[name]}"), name)
    globals()[name] = value
    return value
