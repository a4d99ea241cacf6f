"""The version directory: ``<index_dir>/versions/<version>/{index.faiss, ids.npy, manifest.json}``
(and ``index.ivfdata`` for an index whose inverted lists are on disk,
:mod:`indexing.mechanics.ondisk`).

Publishing is crash-safe in two steps, each atomic on a POSIX file system:

1. a build writes everything into ``<index_dir>/staging/<random>/`` and only a complete staging
   directory is renamed into ``versions/`` (``os.rename`` of a directory);
2. ``CURRENT`` is switched by writing ``CURRENT.tmp`` and ``os.replace``-ing it over ``CURRENT``.

So a reader (the serving runtime polling :func:`current_version`) sees either the old or the new
version, never a half-written one, and a build that dies at any point leaves ``CURRENT`` alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from cachebind.published.layout import (
    CURRENT_FILE,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    VERSION_RE,
    current_version,
    list_versions,
    version_files,
    version_number,
    versions_dir,
)
from cachebind.published.manifest import read_manifest, read_manifest_file, write_manifest

__all__ = [
    "CURRENT_FILE",
    "IDS_FILE",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "VERSION_RE",
    "current_version",
    "file_digests",
    "list_versions",
    "new_staging_dir",
    "prune",
    "publish",
    "set_current",
    "verify_version",
    "version_files",
    "version_number",
    "versions_dir",
]

STALE_STAGING_S = 24 * 3600
"""Staging directories older than this are left-overs of killed builds and are removed."""


def new_staging_dir(index_dir: Path) -> Path:
    """A fresh, private directory to build into (same file system as ``versions/``)."""
    path = Path(index_dir) / "staging" / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path


def _switch_current(index_dir: Path, version: str) -> None:
    tmp = Path(index_dir) / f"{CURRENT_FILE}.tmp.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(index_dir) / CURRENT_FILE)


def file_digests(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of a version's files, for its manifest's ``files``."""
    digests = {}
    for name in names:
        path = Path(folder) / name
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
        digests[name] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return digests


def verify_version(index_dir: Path, version: str) -> list[str]:
    """What is wrong with a published version's files against its manifest (empty: intact).

    Reads every byte, so it is an operator's check (``cachebind index verify``), not a load
    step: a 100M-row version's ivfdata is ~14 GB. Loading checks sizes only.
    """
    folder = versions_dir(index_dir) / version
    recorded = read_manifest(index_dir, version).files
    if not recorded:
        return [f"{version}: no file checksums recorded (built by an older cachebind)"]
    problems = []
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{version}/{name}: missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(
                f"{version}/{name}: {path.stat().st_size} bytes, the manifest says {want['bytes']}"
            )
        elif file_digests(folder, [name])[name]["sha256"] != want["sha256"]:
            problems.append(f"{version}/{name}: sha256 differs from the manifest's (corrupt)")
    return problems


def publish(index_dir: Path, staged: Path, keep_versions: int = 3) -> str:
    """Move a complete staged build into ``versions/``, make it CURRENT, prune old versions.

    The version name (``v000001``, ``v000002`` …) is given here, so concurrent builds never clash:
    the rename fails if another build took the number first, and the next one is tried.
    """
    index_dir = Path(index_dir)
    staged = Path(staged)
    for name in (INDEX_FILE, IDS_FILE, MANIFEST_FILE):
        if not (staged / name).is_file():
            raise FileNotFoundError(f"incomplete build in {staged}: {name} is missing")
    root = versions_dir(index_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = staged / MANIFEST_FILE
    manifest = read_manifest_file(manifest_path)
    for name in manifest.data_files:
        if not (staged / name).is_file():
            raise FileNotFoundError(f"incomplete build in {staged}: {name} is missing")
    existing = list_versions(index_dir)
    number = version_number(existing[-1]) + 1 if existing else 1
    while True:
        version = f"v{number:06d}"
        write_manifest(manifest_path, manifest.with_version(version))
        try:
            os.rename(staged, root / version)
            break
        except OSError:
            if not (root / version).exists():
                raise
            number += 1
    _switch_current(index_dir, version)
    prune(index_dir, keep_versions)
    return version


def set_current(index_dir: Path, version: str) -> None:
    """Point CURRENT at an existing version (a rollback)."""
    if version not in list_versions(index_dir):
        raise FileNotFoundError(f"no version {version!r} in {versions_dir(index_dir)}")
    _switch_current(index_dir, version)


def prune(index_dir: Path, keep_versions: int) -> list[str]:
    """Remove all but the newest ``keep_versions`` versions (never the current one).

    Also removes staging directories left by builds killed more than a day ago.
    Returns the removed version names.
    """
    keep_versions = max(1, keep_versions)
    current = current_version(index_dir)
    versions = list_versions(index_dir)
    keep = set(versions[-keep_versions:]) | ({current} if current else set())
    removed = []
    for name in versions:
        if name not in keep:
            shutil.rmtree(versions_dir(index_dir) / name, ignore_errors=True)
            removed.append(name)
    staging = Path(index_dir) / "staging"
    if staging.is_dir():
        for p in staging.iterdir():
            if time.time() - p.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(p, ignore_errors=True)
    return removed
