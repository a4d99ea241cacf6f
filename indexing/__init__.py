"""indexing: a tuned, verified, versioned FAISS index over the cache's image embeddings.

select (autofaiss key under a memory budget) -> tune (recall target on held-out queries) ->
build (single, or sharded on Ray) -> manifest -> publish (versions + atomic CURRENT) ->
load (alignment check against the table).
"""

from indexing.build import add_rows, build_and_publish, build_index
from indexing.load import LoadedIndex, load_current, load_version
from indexing.manifest import check_alignment, ids_checksum
from indexing.select import Selection, select_index
from indexing.versions import current_version, list_versions, prune, publish, set_current

__all__ = [
    "LoadedIndex",
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
    "select_index",
    "set_current",
]
