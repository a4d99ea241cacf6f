"""What a version records about itself, and the alignment check against a table."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cachebind.arrays import Ints
from cachebind.errors import IndexMismatchError
from cachebind.store import CacheTable

MANIFEST_FORMAT = 1


def ids_checksum(ids: Ints) -> str:
    """sha256 over the int64 table ids in index order (little-endian), as hex."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def table_identity(table: CacheTable, ids: Ints) -> dict[str, Any]:
    """The table facts a version is built from: where, which version, how many rows, which ids."""
    try:
        uri = str(table.dataset.uri)
    except Exception:  # a remote table without a local URI
        uri = None
    return {
        "uri": uri,
        "version": int(table.version),
        "row_count": int(len(ids)),
        "ids_sha256": ids_checksum(ids),
    }


def check_alignment(manifest: dict[str, Any], table: CacheTable, table_ids: Ints) -> None:
    """Raise IndexMismatchError unless ``table`` is the one the index was built from.

    Checked in order of cost: table version, row count, then the checksum of the ids in order.
    Serving an index against another table gives wrong neighbours silently (ids that point at
    other rows, or at none), which is what this refuses.
    """
    built = manifest["table"]
    version = manifest.get("version", "?")
    if int(built["version"]) != int(table.version):
        raise IndexMismatchError(
            f"index {version} was built from table version {built['version']}, but the table "
            f"is at version {table.version}: rebuild (`cachebind index`) or add the new rows "
            "(indexing.add_rows), or open the table at the index's version"
        )
    if int(built["row_count"]) != len(table_ids):
        raise IndexMismatchError(
            f"index {version} holds {built['row_count']} rows, the table has {len(table_ids)}"
        )
    checksum = ids_checksum(table_ids)
    if checksum != built["ids_sha256"]:
        raise IndexMismatchError(
            f"index {version} was built from other ids than the table's (id sha256 "
            f"{built['ids_sha256'][:12]}… != {checksum[:12]}…): the rows differ or are reordered"
        )


# --- query sets: what each kind of query can expect ----------------------------------------

LEGACY_SET = "image:held_out"


def query_sets_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """``manifest["query_sets"]``, or for a manifest written before query sets existed, the one
    set it was measured on (held-out image rows, or the caller's queries) from its top level."""
    sets = manifest.get("query_sets")
    if isinstance(sets, list):
        return sets
    recall = manifest.get("recall") or {}
    if not recall:
        return []
    queries = manifest.get("recall_queries") or {}
    held_out = str(queries.get("kind", "held-out")).startswith("held-out")
    latency = manifest.get("latency_ms") or {}
    b1 = (latency.get("batch_1") or {}).get("p50")
    b64 = (latency.get("batch_64") or {}).get("p50")
    k = str((manifest.get("target") or {}).get("recall_k", 10))
    return [
        {
            "name": LEGACY_SET if held_out else "image:file:caller-supplied",
            "modality": "image",
            "source": "held_out_rows" if held_out else "file",
            "n": int(queries.get("count", 0)),
            # Measured on >= 1000 held-out rows by every earlier build of a real table.
            "trusted": int(queries.get("count", 0)) >= 100,
            "recall": dict(recall),
            "recall_at_target_k_lower": recall.get(k),
            "latency_ms": {
                "batch1_p50": b1,
                "batch64_per_query": b64 / 64 if b64 is not None else None,
            },
        }
    ]


def recall_by_modality(sets: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{modality: {"set", "recall_at_10", "trusted"}}``: the worst trusted set of each
    modality (the worst untrusted one only when none is trusted)."""
    out: dict[str, dict[str, Any]] = {}
    for modality in sorted({s["modality"] for s in sets}):
        mine = [s for s in sets if s["modality"] == modality and "10" in (s.get("recall") or {})]
        if not mine:
            continue
        pool = [s for s in mine if s.get("trusted")] or mine
        worst = min(pool, key=lambda s: s["recall"]["10"])
        out[modality] = {
            "set": worst["name"],
            "recall_at_10": worst["recall"]["10"],
            "trusted": bool(worst.get("trusted")),
        }
    return out


def recall_for(manifest: dict[str, Any], modalities: list[str]) -> dict[str, Any]:
    """What recall a query of ``modalities`` (one, or a mix) can expect from this version.

    ``{"recall_at_10": worst covered part or None, "set": that part's set, "trusted": every part
    trusted, "verified": every modality covered by a measured set, "parts": {modality: {"set",
    "recall_at_10", "trusted", "verified"}}}``. A mixed query's neighbours are found by one
    search of its blended embedding; its recall is bounded by its weakest part, so the worst
    one is reported. A modality no set covers is ``verified: False`` (``set`` None).
    """
    by_modality = manifest.get("recall_by_modality")
    if not isinstance(by_modality, dict):
        by_modality = recall_by_modality(query_sets_of(manifest))
    parts: dict[str, dict[str, Any]] = {}
    for modality in dict.fromkeys(str(m) for m in modalities):
        known = by_modality.get(modality)
        if known is None:
            parts[modality] = {
                "set": None,
                "recall_at_10": None,
                "trusted": False,
                "verified": False,
            }
        else:
            parts[modality] = {
                "set": known["set"],
                "recall_at_10": known["recall_at_10"],
                "trusted": bool(known["trusted"]),
                "verified": True,
            }
    covered = [p for p in parts.values() if p["verified"]]
    worst = min(covered, key=lambda p: p["recall_at_10"]) if covered else None
    return {
        "recall_at_10": worst["recall_at_10"] if worst else None,
        "set": worst["set"] if worst else None,
        "trusted": bool(parts) and all(p["trusted"] for p in parts.values()),
        "verified": bool(parts) and all(p["verified"] for p in parts.values()),
        "parts": parts,
    }


def search_params_for(
    manifest: dict[str, Any], modalities: Sequence[str | None] | None
) -> dict[str, Any]:
    """The setting a query of ``modalities`` (one, or a mix; None: unlabelled) is searched with.

    Each modality tuned on its own (``search_params_by_modality``, :mod:`indexing.bymodality`)
    has its setting; a mix takes each knob's largest value among its parts; a part no set
    tuned (or a raw embedding) takes the global ``search_params``, which every trusted set
    reaches.
    """
    from indexing.params import strongest

    default = dict(manifest.get("search_params") or {})
    by_modality = manifest.get("search_params_by_modality") or {}
    if not modalities:
        return default
    chosen = []
    for modality in modalities:
        if modality is None or modality not in by_modality:
            return default
        chosen.append(by_modality[modality])
    return strongest(chosen)


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
    table: dict[str, Any],
    software: dict[str, str],
    trials: list[dict[str, Any]],
    selection_reason: str | None = None,
    search_params_by_modality: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """A version's manifest (``version`` is given by publish; ``files`` added by the writer).

    ``headline``: the query-set report the top-level ``recall`` / ``recall_queries`` describe
    (the worst trusted set), kept for readers from before query sets.
    """
    from indexing.measure import KIND

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": None,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "index_key": key,
        "metric": "inner_product",
        "dim": dim,
        "ntotal": ntotal,
        "search_params": search_params,
        "search_params_by_modality": search_params_by_modality or {},
        "selection": selection,
        "target": target,
        "recall": dict(headline["recall"]) if headline else {},
        "recall_queries": {
            "count": headline["n"] if headline else 0,
            "kind": KIND.get(headline["source"], headline["source"]) if headline else "none",
        },
        "query_sets": query_sets,
        "recall_by_modality": recall_by_modality(query_sets),
        "latency_ms": latency,
        "memory_bytes": int(memory_bytes),
        "build_time_s": {k: round(v, 3) for k, v in timings.items()}
        | {"total_s": round(sum(timings.values()), 3)},
        "table": table,
        "software": software,
        "tuning_trials": trials,
    }
    if selection_reason:
        manifest["selection_reason"] = selection_reason
    return manifest
