"""Which table versions the published index versions need, as Lance tags, and the store's gc.

A published index version was built from one table version (its manifest's ``table``); the
service reads rows at that version. :func:`protect_published` tags each such version
``cachebind-index-<dir>-<version>`` (``<dir>``: a digest of the index directory, so that two
index directories over one table keep their own tags) and deletes the tags of index versions
that were pruned since. :func:`collect` syncs the tags, then removes what the retention allows
(:mod:`cachebind.store.gc`): Lance's cleanup never removes a tagged version.

While an index build or ``index add`` reads a table version, :func:`pinned` tags it too.

Called after a publish (``cachebind index``, ``index add``, ``index tune``), after an embedding
job and after ``index add`` (with the collection), and by ``cachebind store gc``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cachebind.config import Settings, StoreConfig
from cachebind.published.manifest import read_manifest
from cachebind.storage import lance_options, protocol_of
from cachebind.store import CacheTable
from cachebind.store.gc import GcReport, collect_store, table_uri
from indexing.versions.publishing import STALE_STAGING_S, list_versions

log = logging.getLogger(__name__)
TAG_PREFIX = "cachebind-index-"
BUILD_PREFIX = "cachebind-build-"
"""``cachebind-build-<unix time>-<random>``: a version an index build or add is reading."""


def tag_prefix(index_dir: Path) -> str:
    digest = hashlib.sha256(str(Path(index_dir).resolve()).encode()).hexdigest()[:10]
    return f"{TAG_PREFIX}{digest}-"


def _same_table(recorded: str | None, uri: str) -> bool:
    if recorded is None:  # an older manifest: assume the configured table
        return True
    if protocol_of(uri) == "file":
        return os.path.realpath(recorded) == os.path.realpath(uri)
    return recorded.rstrip("/") == uri.rstrip("/")


def published_table_versions(index_dir: Path, uri: str) -> dict[str, int]:
    """index version -> the table version it was built from, for versions over ``uri``."""
    found: dict[str, int] = {}
    for version in list_versions(index_dir):
        try:
            table = read_manifest(index_dir, version).table
        except (OSError, ValueError):
            continue
        if _same_table(table.uri, uri):
            found[version] = table.version
    return found


def protect_published(index_dir: Path, store: StoreConfig) -> dict[str, int]:
    """Tag the table versions the index versions in ``index_dir`` use; untag pruned ones.
    Returns the tags now held by this index directory (tag -> table version)."""
    import lance

    uri = table_uri(store, store.table)
    try:
        dataset = lance.dataset(uri, storage_options=lance_options(store.uri, store.s3))
    except (OSError, ValueError):  # no table yet
        return {}
    prefix = tag_prefix(index_dir)
    wanted = {f"{prefix}{v}": t for v, t in published_table_versions(index_dir, uri).items()}
    existing: dict[str, Any] = {
        name: tag for name, tag in dataset.tags.list().items() if name.startswith(prefix)
    }
    for name, tag in existing.items():
        if wanted.get(name) != int(tag["version"]):
            dataset.tags.delete(name)
    for name in dataset.tags.list():  # pins left by builds killed long ago
        if name.startswith(BUILD_PREFIX) and _stale(name):
            dataset.tags.delete(name)
    for name, version in wanted.items():
        if name in existing and int(existing[name]["version"]) == version:
            continue
        try:
            dataset.tags.create(name, version)
        except (OSError, ValueError) as exc:  # the table version is already gone
            log.warning("cannot protect table version %d for %s: %s", version, name, exc)
    return wanted


def _stale(build_tag: str) -> bool:
    try:
        started = int(build_tag[len(BUILD_PREFIX) :].split("-")[0])
    except ValueError:
        return False
    return time.time() - started > STALE_STAGING_S


@contextlib.contextmanager
def pinned(table: CacheTable) -> Iterator[None]:
    """Tag ``table``'s version while the block runs (an index build or add reading it), so
    that a gc at any retention keeps it; the tag is deleted after. A pin the process could not
    delete (it was killed) is removed by a gc a day later."""
    name = f"{BUILD_PREFIX}{int(time.time())}-{uuid.uuid4().hex[:8]}"
    tags = table.dataset.tags
    try:
        tags.create(name, int(table.version))
    except (OSError, ValueError) as exc:  # e.g. a read-only location: build unprotected
        log.warning("cannot pin table version %d during the build: %s", table.version, exc)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            tags.delete(name)


def collect(
    settings: Settings, *, retention_s: float | None = None, orphans: bool = False
) -> GcReport:
    """Protect what ``settings.index.dir``'s published versions use, then clean the store."""
    protect_published(settings.index.dir, settings.store)
    retention = settings.store.retention_s if retention_s is None else retention_s
    return collect_store(settings.store, retention, orphans)
