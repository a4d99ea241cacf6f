"""What a version records about itself: the typed :class:`Manifest`, read and written here only.

A manifest is JSON (``manifest.json`` in the version's folder). :meth:`Manifest.from_json` reads
every manifest cachebind has written: a key added since (``query_sets``, ``recall_by_modality``,
``search_params_by_modality``, ``storage``, ``files`` ...) takes the value that describes what an
older build did, so an old version still loads, serves and reports its recall. Keys this code
does not know are kept in ``extra`` and written back, so a newer writer's facts survive a
round trip through an older reader.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cachebind.arrays import Ints
from cachebind.errors import IndexMismatchError
from cachebind.published.layout import MANIFEST_FILE, storage_files, versions_dir

if TYPE_CHECKING:
    from cachebind.store import CacheTable

MANIFEST_FORMAT = 1
LEGACY_SET = "image:held_out"
"""The name given to the one query set of a manifest written before query sets existed."""


def ids_checksum(ids: Ints) -> str:
    """sha256 over the int64 table ids in index order (little-endian), as hex."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class TableRef:
    """The table a version was built from: where, which version, how many rows, which ids."""

    uri: str | None
    version: int
    row_count: int
    ids_sha256: str
    column: str = "vector"
    """The table's global column the index holds (an extra encoder's ``vector_<name>``)."""

    @classmethod
    def from_json(cls, obj: Any) -> TableRef:
        if not isinstance(obj, Mapping):
            raise ValueError(f"manifest 'table' must be an object, got {type(obj).__name__}")
        try:
            return cls(
                uri=None if obj.get("uri") is None else str(obj["uri"]),
                version=int(obj["version"]),
                row_count=int(obj["row_count"]),
                ids_sha256=str(obj["ids_sha256"]),
                column=str(obj.get("column", "vector")),
            )
        except KeyError as exc:
            raise ValueError(f"manifest 'table' has no {exc.args[0]!r}") from None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "uri": self.uri,
            "version": self.version,
            "row_count": self.row_count,
            "ids_sha256": self.ids_sha256,
        }
        if self.column != "vector":  # ImageBind's index reads as it always did
            out["column"] = self.column
        return out


_OPTIONAL = ("selection_reason", "files", "added_rows", "shards", "update")
"""Keys written only when set (a reader tells "absent" from "empty" for these)."""


@dataclass(frozen=True)
class Manifest:
    """A published (or staged: ``version`` None) index version's description.

    The JSON object is the storage form; this is what code reads. Its dicts are the manifest's
    own and must not be modified: build a new one with :func:`dataclasses.replace`.
    """

    index_key: str
    dim: int
    table: TableRef
    version: str | None = None
    format: int = MANIFEST_FORMAT
    created_at: str | None = None
    metric: str = "inner_product"
    ntotal: int = 0
    search_params: dict[str, int] = field(default_factory=dict)
    search_params_by_modality: dict[str, dict[str, int]] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    selection_reason: str | None = None
    target: dict[str, Any] = field(default_factory=dict)
    recall: dict[str, float] = field(default_factory=dict)
    """The headline (worst trusted set's) recall@k, kept for readers from before query sets."""
    recall_queries: dict[str, Any] = field(default_factory=dict)
    query_sets: list[dict[str, Any]] = field(default_factory=list)
    recall_by_modality: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_ms: dict[str, Any] = field(default_factory=dict)
    memory_bytes: int = 0
    build_time_s: dict[str, float] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)
    tuning_trials: list[dict[str, Any]] = field(default_factory=list)
    storage: dict[str, Any] = field(default_factory=lambda: {"invlists": "memory"})
    """``{"invlists": "memory"}``, or ``"ondisk"`` with ``ivfdata`` and ``ivfdata_bytes``."""
    files: dict[str, dict[str, Any]] | None = None
    """``{name: {"bytes", "sha256"}}``; None for a version built before checksums."""
    parent_version: str | None = None
    added_rows: int | None = None
    shards: int | None = None
    update: dict[str, Any] | None = None
    """How an ``add`` / ``tune`` made this version from ``parent_version``, and why."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this code does not know, written back unchanged."""

    @property
    def on_disk(self) -> bool:
        return self.storage.get("invlists") == "ondisk"

    @property
    def data_files(self) -> list[str]:
        """The version's files beyond index, ids and manifest (an on-disk index's ivfdata)."""
        return storage_files(self.storage)

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        """Read a manifest's JSON object; ValueError names what is missing or malformed."""
        if isinstance(obj, Manifest):
            return obj
        if not isinstance(obj, Mapping):
            raise ValueError(f"a manifest is a JSON object, got {type(obj).__name__}")
        for key in ("index_key", "dim", "table"):
            if key not in obj:
                raise ValueError(f"manifest has no {key!r}")
        known = {f.name for f in fields(cls)} - {"extra", "table"}
        values: dict[str, Any] = {k: obj[k] for k in known if k in obj and obj[k] is not None}
        table = TableRef.from_json(obj["table"])
        values["dim"] = int(obj["dim"])
        values["index_key"] = str(obj["index_key"])
        values.setdefault("ntotal", table.row_count)
        for key in ("ntotal", "memory_bytes", "format"):
            if key in values:
                values[key] = int(values[key])
        if not isinstance(values.get("query_sets"), list):
            values["query_sets"] = legacy_query_sets(obj)
        if not isinstance(values.get("recall_by_modality"), dict):
            values["recall_by_modality"] = recall_by_modality(values["query_sets"])
        extra = {k: v for k, v in obj.items() if k not in known and k != "table"}
        return cls(table=table, extra=extra, **values)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this manifest (what :func:`write_manifest` stores)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value is None:
                continue
            out[f.name] = value.to_json() if isinstance(value, TableRef) else value
        return out | self.extra

    def with_version(self, version: str | None) -> Manifest:
        return replace(self, version=version)


def as_manifest(manifest: Manifest | Mapping[str, Any]) -> Manifest:
    """``manifest`` typed (a JSON object is read with :meth:`Manifest.from_json`)."""
    return Manifest.from_json(manifest)


def parse_manifest(text: str | bytes, where: Path | str = "manifest") -> Manifest:
    """A manifest from its JSON text; ValueError naming ``where`` for anything else."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds a JSON {type(obj).__name__}, not a manifest object")
    try:
        return Manifest.from_json(obj)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_manifest(index_dir: Path | str, version: str) -> Manifest:
    """The manifest of ``version`` under ``index_dir``."""
    path = versions_dir(index_dir) / version / MANIFEST_FILE
    return parse_manifest(path.read_bytes(), path)


def read_manifest_file(path: Path | str) -> Manifest:
    return parse_manifest(Path(path).read_bytes(), path)


def write_manifest(path: Path | str, manifest: Manifest | Mapping[str, Any]) -> Manifest:
    """Write ``manifest`` (checked by reading it as a :class:`Manifest`) as JSON to ``path``.

    Returns the typed manifest written. A staged version's folder is renamed into place only
    when complete, so a plain write is enough here.
    """
    typed = as_manifest(manifest)
    Path(path).write_text(json.dumps(typed.to_json(), indent=2))
    return typed


def check_alignment(
    manifest: Manifest | Mapping[str, Any], table: CacheTable, table_ids: Ints
) -> None:
    """Raise IndexMismatchError unless ``table`` is the one the index was built from.

    Checked in order of cost: table version, row count, then the checksum of the ids in order.
    Serving an index against another table gives wrong neighbours silently (ids that point at
    other rows, or at none), which is what this refuses.
    """
    m = as_manifest(manifest)
    built = m.table
    version = m.version or "?"
    if built.column != table.column:
        # Another encoder's vectors: its neighbours of a query of this column mean nothing.
        raise IndexMismatchError(
            f"index {version} holds the table's {built.column!r} vectors, but they are read "
            f"as {table.column!r} here: open the table with that column (index.column / "
            f"--column {built.column}), or use the index of {table.column!r}"
        )
    if built.version != int(table.version):
        raise IndexMismatchError(
            f"index {version} was built from table version {built.version}, but the table "
            f"is at version {table.version}: rebuild (`cachebind index`) or add the new rows "
            "(`cachebind index add`), or open the table at the index's version"
        )
    if built.row_count != len(table_ids):
        raise IndexMismatchError(
            f"index {version} holds {built.row_count} rows, the table has {len(table_ids)}"
        )
    checksum = ids_checksum(table_ids)
    if checksum != built.ids_sha256:
        raise IndexMismatchError(
            f"index {version} was built from other ids than the table's (id sha256 "
            f"{built.ids_sha256[:12]}… != {checksum[:12]}…): the rows differ or are reordered"
        )


# --- query sets: what each kind of query can expect ----------------------------------------


def legacy_query_sets(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """For a manifest written before query sets existed, the one set it was measured on
    (held-out image rows, or the caller's queries), from its top level."""
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


def query_sets_of(manifest: Manifest | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The query sets ``manifest`` was measured on (see :func:`legacy_query_sets`)."""
    if isinstance(manifest, Manifest):
        return manifest.query_sets
    sets = manifest.get("query_sets")
    return sets if isinstance(sets, list) else legacy_query_sets(manifest)


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


def recall_by_modality_of(manifest: Manifest | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's ``recall_by_modality``, derived from its query sets when it has none.

    Takes a partial JSON object too (an in-memory index's description, say): it only promises
    what it measured.
    """
    if isinstance(manifest, Manifest):
        return manifest.recall_by_modality
    known = manifest.get("recall_by_modality")
    return known if isinstance(known, dict) else recall_by_modality(query_sets_of(manifest))


def recall_for(manifest: Manifest | Mapping[str, Any], modalities: list[str]) -> dict[str, Any]:
    """What recall a query of ``modalities`` (one, or a mix) can expect from this version.

    ``{"recall_at_10": worst covered part or None, "set": that part's set, "trusted": every part
    trusted, "verified": every modality covered by a measured set, "parts": {modality: {"set",
    "recall_at_10", "trusted", "verified"}}}``. A mixed query's neighbours are found by one
    search of its blended embedding; its recall is bounded by its weakest part, so the worst
    one is reported. A modality no set covers is ``verified: False`` (``set`` None).
    """
    by_modality = recall_by_modality_of(manifest)
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
    manifest: Manifest | Mapping[str, Any], modalities: Sequence[str | None] | None
) -> dict[str, int]:
    """The setting a query of ``modalities`` (one, or a mix; None: unlabelled) is searched with.

    Each modality tuned on its own (``search_params_by_modality``) has its setting; a mix takes
    each knob's largest value among its parts; a part no set tuned (or a raw embedding) takes
    the global ``search_params``, which every trusted set reaches.
    """
    from cachebind.published.params import strongest  # FAISS: only when a query asks

    if isinstance(manifest, Manifest):
        default, by_modality = manifest.search_params, manifest.search_params_by_modality
    else:
        default = manifest.get("search_params") or {}
        by_modality = manifest.get("search_params_by_modality") or {}
    if not modalities:
        return dict(default)
    chosen = []
    for modality in modalities:
        if modality is None or modality not in by_modality:
            return dict(default)
        chosen.append(by_modality[modality])
    return strongest(chosen)
