"""What a served index version promises, per query set and per query: read from its manifest.

:mod:`cachebind.published.manifest` owns the format (the typed ``Manifest``, its query sets,
``recall_for``); this module only turns it into the response models, so a manifest written
before query sets existed reports its one held-out image set and an unmeasured index none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cachebind.published.manifest import (
    Manifest,
    query_sets_of,
    recall_by_modality_of,
    recall_for,
)
from cachebind.serve import schemas as s

UNLABELLED = "embedding"
"""The part name of a raw embedding sent without a modality: no query set can cover it."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _params(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict) or not value:  # none recorded: an exact index has none
        return None
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int | float)}


def query_set_reports(manifest: Manifest | Mapping[str, Any]) -> list[s.QuerySetReport]:
    """Each query set of ``manifest`` with its recall@1/10/100 and latency."""
    default_params = (
        manifest.search_params if isinstance(manifest, Manifest) else manifest.get("search_params")
    )
    reports = []
    for qs in query_sets_of(manifest):
        recall = qs.get("recall") or {}
        latency = qs.get("latency_ms") or {}
        reports.append(
            s.QuerySetReport(
                name=str(qs.get("name")),
                modality=str(qs.get("modality")),
                source=qs.get("source"),
                n=qs.get("n"),
                trusted=bool(qs.get("trusted")),
                recall_at_1=_number(recall.get("1")),
                recall_at_10=_number(recall.get("10")),
                recall_at_100=_number(recall.get("100")),
                latency_ms=s.QuerySetLatency(
                    batch1_p50=_number(latency.get("batch1_p50")),
                    batch64_per_query=_number(latency.get("batch64_per_query")),
                ),
                search_params=_params(qs.get("search_params", default_params)),
            )
        )
    return reports


def recall_by_modality_report(manifest: Manifest | Mapping[str, Any]) -> dict[str, s.RecallPart]:
    """The worst trusted set of each modality the manifest measured."""
    return {
        m: s.RecallPart(
            set=v.get("set"),
            recall_at_10=_number(v.get("recall_at_10")),
            trusted=bool(v.get("trusted")),
            verified=True,
        )
        for m, v in recall_by_modality_of(manifest).items()
    }


def recall_info(
    manifest: Manifest | Mapping[str, Any], labels: Sequence[str | None]
) -> s.RecallInfo:
    """The recall that applies to a query of these input modalities (None: unlabelled)."""
    found = recall_for(manifest, [label or UNLABELLED for label in labels])
    return s.RecallInfo(
        set=found["set"],
        recall_at_10=_number(found["recall_at_10"]),
        trusted=bool(found["trusted"]),
        verified=bool(found["verified"]),
        parts={m: s.RecallPart(**p) for m, p in found["parts"].items()},
    )
