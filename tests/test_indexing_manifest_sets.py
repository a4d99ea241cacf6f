"""What a manifest promises per query set and per modality, for new and old manifests alike."""

from __future__ import annotations

from cachebind.published.manifest import query_sets_of, recall_by_modality, recall_for


def qset(name: str, modality: str, r10: float, trusted: bool = True, n: int = 1000) -> dict:
    return {
        "name": name,
        "modality": modality,
        "source": name.split(":")[1],
        "n": n,
        "trusted": trusted,
        "recall": {"1": r10, "10": r10, "100": r10},
        "recall_at_target_k_lower": r10 - 0.01,
        "latency_ms": {"batch1_p50": 1.0, "batch64_per_query": 0.1},
    }


SETS = [
    qset("image:held_out", "image", 0.97),
    qset("text:captions", "text", 0.96),
    qset("text:query_log", "text", 0.955),
    qset("audio:query_log", "audio", 0.80, trusted=False, n=12),
    qset("text:file:tiny.npy", "text", 0.5, trusted=False, n=5),
]


def test_each_modality_reports_its_worst_trusted_set_and_untrusted_only_without_one() -> None:
    assert recall_by_modality(SETS) == {
        "audio": {"set": "audio:query_log", "recall_at_10": 0.80, "trusted": False},
        "image": {"set": "image:held_out", "recall_at_10": 0.97, "trusted": True},
        "text": {"set": "text:query_log", "recall_at_10": 0.955, "trusted": True},
    }


def test_a_mixed_query_gets_the_worst_of_its_parts_and_an_unknown_modality_is_unverified() -> None:
    manifest = {"query_sets": SETS, "recall_by_modality": recall_by_modality(SETS)}
    text = recall_for(manifest, ["text"])
    assert text["recall_at_10"] == 0.955 and text["set"] == "text:query_log"
    assert text["verified"] and text["trusted"]
    mixed = recall_for(manifest, ["image", "audio"])
    assert mixed["recall_at_10"] == 0.80 and mixed["set"] == "audio:query_log"
    assert mixed["verified"] and not mixed["trusted"]
    thermal = recall_for(manifest, ["text", "thermal"])
    assert thermal["verified"] is False and thermal["recall_at_10"] == 0.955
    assert thermal["parts"]["thermal"] == {
        "set": None,
        "recall_at_10": None,
        "trusted": False,
        "verified": False,
    }
    # Derived from query_sets when recall_by_modality is absent.
    assert recall_for({"query_sets": SETS}, ["text"]) == text


def test_a_manifest_from_before_query_sets_reports_its_held_out_image_recall() -> None:
    old = {
        "recall": {"1": 0.9, "10": 0.953, "100": 0.97},
        "recall_queries": {"count": 1000, "kind": "held-out table rows, leave-one-out"},
        "latency_ms": {"batch_1": {"p50": 0.5}, "batch_64": {"p50": 6.4}},
        "target": {"recall_k": 10},
    }
    (only,) = query_sets_of(old)
    assert only["name"] == "image:held_out" and only["trusted"] and only["n"] == 1000
    assert only["latency_ms"] == {"batch1_p50": 0.5, "batch64_per_query": 0.1}
    image = recall_for(old, ["image"])
    assert image["recall_at_10"] == 0.953 and image["verified"]
    assert recall_for(old, ["text"])["verified"] is False
    assert recall_for({}, ["image"])["verified"] is False
