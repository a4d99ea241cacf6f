"""Object stores: the configuration's S3 section (``store.s3``) turned into what each library
expects. fsspec (sources, the job report) and Lance (the table) name the same settings
differently, and each would otherwise fall back to its own view of the environment, which on a
Ray cluster is the worker's, not the driver's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from cachebind.config import S3Config

S3_PROTOCOLS = ("s3", "s3a")


def protocol_of(uri: str) -> str:
    """``s3`` for ``s3://b/k``, ``file`` for a local path."""
    protocol, _ = fsspec.core.split_protocol(str(uri))
    return protocol or "file"


def is_s3(uri: str) -> bool:
    return protocol_of(uri) in S3_PROTOCOLS


@dataclass(frozen=True)
class StorageOptions:
    """fsspec keyword arguments per protocol (``{"s3": {"endpoint_url": …, "key": …}}``).

    Passed to readers beside a partition, never inside it: a partition's options are recorded
    and fingerprinted for resumption, and credentials must neither be stored there nor make a
    finished shard look new when they are rotated. Hashable (by equality of the options), so
    that readers may cache listings per store.
    """

    fsspec: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    @classmethod
    def from_s3(cls, s3: S3Config | None) -> StorageOptions:
        if s3 is None:
            return cls()
        # s3fs caches listings per filesystem instance, and fsspec keeps instances for the life
        # of the process: a second job in the same process (a notebook, a scheduler) must see
        # the shards uploaded since the first, not the first job's listing.
        kwargs: dict[str, Any] = {"use_listings_cache": False}
        if s3.endpoint_url:
            kwargs["endpoint_url"] = s3.endpoint_url
        if s3.region:
            kwargs["client_kwargs"] = {"region_name": s3.region}
        if s3.anonymous:
            kwargs["anon"] = True
        else:
            if s3.access_key_id:
                kwargs["key"] = s3.access_key_id
            if s3.secret_access_key:
                kwargs["secret"] = s3.secret_access_key.get_secret_value()
            if s3.session_token:
                kwargs["token"] = s3.session_token.get_secret_value()
        return cls({p: kwargs for p in S3_PROTOCOLS})

    def for_uri(self, uri: str) -> dict[str, Any]:
        """The keyword arguments for the filesystem of ``uri`` (none for a local path)."""
        return dict(self.fsspec.get(protocol_of(uri), {}))

    def url_to_fs(self, uri: str) -> tuple[AbstractFileSystem, str]:
        fs_and_path: tuple[AbstractFileSystem, str] = fsspec.core.url_to_fs(
            uri, **self.for_uri(uri)
        )
        return fs_and_path

    def open(self, uri: str, mode: str = "rb") -> Any:
        """``fsspec.open`` with this store's options (use as a context manager)."""
        return fsspec.open(uri, mode, **self.for_uri(uri))


def lance_options(uri: str, s3: S3Config | None) -> dict[str, str] | None:
    """``storage_options`` for ``lancedb.connect``/``lance.dataset`` at ``uri`` (None when the
    location is not on S3 or nothing is configured, leaving Lance's own defaults)."""
    if s3 is None or not is_s3(uri):
        return None
    options: dict[str, str] = {}
    if s3.endpoint_url:
        options["aws_endpoint"] = s3.endpoint_url
    if s3.region:
        options["aws_region"] = s3.region
    if s3.http_allowed:
        options["allow_http"] = "true"
    if s3.anonymous:
        options["aws_skip_signature"] = "true"
    else:
        if s3.access_key_id:
            options["aws_access_key_id"] = s3.access_key_id
        if s3.secret_access_key:
            options["aws_secret_access_key"] = s3.secret_access_key.get_secret_value()
        if s3.session_token:
            options["aws_session_token"] = s3.session_token.get_secret_value()
    return options or None
