"""The version directory: ``<index_dir>/versions/<version>/{index.faiss, ids.npy, manifest.json}``
(and ``index.ivfdata`` for an index whose inverted lists are on disk), and the ``CURRENT`` file
naming the published one.

Writers (``indexing.versions.publishing``) switch ``CURRENT`` atomically; readers here only look, so
a reader sees either the old or the new version, never a half-written one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
VERSION_RE = re.compile(r"^v(\d{6})$")


def versions_dir(index_dir: Path | str) -> Path:
    return Path(index_dir) / "versions"


def current_version(index_dir: Path | str) -> str | None:
    """The published version name, or None. Cheap: one small file read (polled by serving)."""
    try:
        name = (Path(index_dir) / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def version_number(name: str) -> int:
    """The number of a version name (``v000012`` -> 12); ValueError for any other name."""
    match = VERSION_RE.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a version name")
    return int(match.group(1))


def list_versions(index_dir: Path | str) -> list[str]:
    """Complete versions, oldest first."""
    root = versions_dir(index_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
    return sorted(names, key=version_number)


def storage_files(storage: Mapping[str, Any]) -> list[str]:
    """A version's files beyond index, ids and manifest, from its manifest's ``storage``: an
    on-disk index's ivfdata. They live in the version's folder, so publishing moves them and
    pruning removes them with it."""
    return [str(storage["ivfdata"])] if storage.get("invlists") == "ondisk" else []


def version_files(manifest: Mapping[str, Any]) -> list[str]:
    """:func:`storage_files` of a manifest's JSON object."""
    return storage_files(manifest.get("storage") or {})
