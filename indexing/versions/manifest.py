"""Building a version's typed manifest (the builder's side; reading and writing it is
:mod:`cachebind.published.manifest`'s)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cachebind.arrays import Ints
from cachebind.published.manifest import (
    MANIFEST_FORMAT,
    Manifest,
    TableRef,
    ids_checksum,
    recall_by_modality,
)
from cachebind.store import CacheTable

KIND = {
    "held_out_rows": "held-out table rows, leave-one-out",
    "captions": "caption embeddings, leave-one-out",
    "query_log": "served queries (query log)",
    "file": "caller-supplied queries",
}
"""The top-level ``recall_queries.kind`` of a manifest, by the headline set's source."""


def table_identity(table: CacheTable, ids: Ints) -> TableRef:
    """The table facts a version is built from: where, which version, how many rows, which ids."""
    try:
        uri = str(table.dataset.uri)
    except Exception:  # a remote table without a local URI
        uri = None
    return TableRef(
        uri=uri,
        version=int(table.version),
        row_count=int(len(ids)),
        ids_sha256=ids_checksum(ids),
        column=table.column,
    )


def headline_fields(headline: dict[str, Any] | None) -> dict[str, Any]:
    """The top-level ``recall`` / ``recall_queries`` describing ``headline`` (the worst trusted
    query set's report), kept for readers from before query sets."""
    return {
        "recall": dict(headline["recall"]) if headline else {},
        "recall_queries": {
            "count": headline["n"] if headline else 0,
            "kind": KIND.get(headline["source"], headline["source"]) if headline else "none",
        },
    }


def build_times(timings: dict[str, float]) -> dict[str, float]:
    """Each step's seconds, rounded, and their total."""
    return {k: round(v, 3) for k, v in timings.items()} | {
        "total_s": round(sum(timings.values()), 3)
    }


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def build_manifest(
    *,
    key: str,
    dim: int,
    ntotal: int,
    search_params: dict[str, Any],
    selection: dict[str, Any],
    target: dict[str, Any],
    query_sets: list[dict[str, Any]],
    headline: dict[str, Any] | None,
    latency: dict[str, Any],
    memory_bytes: int,
    timings: dict[str, float],
    table: TableRef,
    software: dict[str, str],
    trials: list[dict[str, Any]],
    selection_reason: str | None = None,
    search_params_by_modality: dict[str, dict[str, int]] | None = None,
) -> Manifest:
    """A version's manifest (``version`` is given by publish; ``files`` added by the writer)."""
    return Manifest(
        format=MANIFEST_FORMAT,
        version=None,
        created_at=now(),
        index_key=key,
        metric="inner_product",
        dim=dim,
        ntotal=ntotal,
        search_params=search_params,
        search_params_by_modality=search_params_by_modality or {},
        selection=selection,
        target=target,
        **headline_fields(headline),
        query_sets=query_sets,
        recall_by_modality=recall_by_modality(query_sets),
        latency_ms=latency,
        memory_bytes=int(memory_bytes),
        build_time_s=build_times(timings),
        table=table,
        software=software,
        tuning_trials=trials,
        selection_reason=selection_reason or None,
    )
