"""What colours the map: a zero-shot label table, the row's shard, or a word of its caption.

A colouring is written ``label:<label table>``, ``shard`` or ``word:<word>``; every point gets
one category (a string) or None where the row has no value (no label, no shard, no caption).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from cachebind.analysis.labelling import open_side_table
from cachebind.config import StoreConfig
from cachebind.store import CacheTable

WORD = re.compile(r"[^\W_]{1,40}")
"""A caption word that can colour the map: letters and digits, as the caption tokenizer splits."""


@dataclass(frozen=True)
class Colouring:
    kind: Literal["label", "shard", "word"]
    value: str | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"


def parse_colouring(spec: str, table: str) -> Colouring:
    """``label:<table>_labels_<hash>``, ``shard`` or ``word:<word>``; ValueError naming the
    problem otherwise."""
    kind, _, value = spec.partition(":")
    if kind == "shard" and not value:
        return Colouring("shard")
    if kind == "label":
        if not re.fullmatch(rf"{re.escape(table)}_labels_[0-9a-f]{{12}}", value):
            raise ValueError(f"label: must name a label table of {table!r}")
        return Colouring("label", value)
    if kind == "word":
        if not WORD.fullmatch(value):
            raise ValueError("word: must be one word of letters or digits (at most 40)")
        return Colouring("word", value.lower())
    raise ValueError("color must be label:<label table>, shard or word:<word>")


def caption_has_word(captions: pa.Array, word: str) -> pa.Array:
    """True where the caption holds ``word`` as a whole word, case-insensitively (null: no
    caption)."""
    return pc.match_substring_regex(
        pc.utf8_lower(captions), rf"(^|[^[:alnum:]]){re.escape(word)}([^[:alnum:]]|$)"
    )


def colour_points(
    store: StoreConfig, version: int, ids: pa.Array, colouring: Colouring
) -> list[str | None]:
    """One category per id, in the order of ``ids``, from the table version the map describes
    (or the label table). Rows with no value are None."""
    if colouring.kind == "label":
        assert colouring.value is not None
        side = open_side_table(store, colouring.value).to_lance().to_table(columns=["id", "label"])
        keyed = side.rename_columns(["id", "category"])
    else:
        column = "shard" if colouring.kind == "shard" else "caption"
        rows = CacheTable.open(store, version).dataset.to_table(columns=["id", column])
        values = rows.column(column)
        if colouring.kind == "word":
            word = colouring.value or ""
            has = caption_has_word(values, word)
            values = pc.if_else(has, pa.scalar(word), pa.scalar(f"no {word}"))
        keyed = pa.table({"id": rows.column("id"), "category": values})
    order = pa.table({"id": ids, "_at": pa.array(range(len(ids)), pa.int64())})
    joined = order.join(keyed, "id", join_type="left outer").sort_by("_at")
    return joined.column("category").to_pylist()
