"""``classify_table``: zero-shot labels for every row of an images table, in one process.

Memory is bounded by ``analysis.batch_rows`` vectors, the class matrix and the ids already
labelled; each batch is one commit, so an interrupted run resumes where it stopped (the Ray job
in ``jobs/classify.py`` does the same with fragments as the unit of work).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cachebind.analysis.classify import class_embeddings, label_rows
from cachebind.analysis.labelling import (
    LabelSet,
    LabelWriter,
    iter_unlabelled,
    open_side_table,
    side_metadata,
)
from cachebind.analysis.templates import (
    IMAGENET_TEMPLATES,
    LabelSetError,
    check_labels,
    check_templates,
)
from cachebind.config import AnalysisConfig, Settings
from cachebind.modalities import Modality
from cachebind.store import CacheTable


@dataclass
class Evaluation:
    """Accuracy against a ground-truth column, over the rows that have both."""

    column: str
    rows: int
    accuracy: float
    confusion: pd.DataFrame
    """Counts: one row per truth value (labels first, in order), one column per label."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "rows": self.rows,
            "accuracy": self.accuracy,
            "confusion": {
                "truth": [str(i) for i in self.confusion.index],
                "predicted": [str(c) for c in self.confusion.columns],
                "counts": self.confusion.to_numpy().tolist(),
            },
        }


@dataclass
class ClassifyResult:
    name: str
    """The side table's name."""
    table_version: int
    labelled: int
    """Rows labelled by this run."""
    total: int
    """Rows the side table holds now."""
    seconds: float
    evaluation: Evaluation | None = None
    label_counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("name", "table_version", "labelled", "total")}
        out["seconds"] = round(self.seconds, 3)
        out["label_counts"] = self.label_counts
        out["evaluation"] = self.evaluation.to_dict() if self.evaluation else None
        return out


def text_embedder(encoder: Any, limits: Any = None) -> Any:
    """``embed_texts`` of an :class:`cachebind.encode.Encoder` (its text branch)."""
    return lambda texts: encoder.embed(Modality.TEXT, texts, limits=limits)


def prepare(
    encoder: Any,
    labels: Sequence[str],
    templates: Sequence[str] | None,
    top_k: int | None,
    config: AnalysisConfig,
) -> tuple[LabelSet, np.ndarray]:
    """The checked label set and its class matrix ``[labels, d]``."""
    labels = check_labels(labels, config.max_labels)
    templates = check_templates(templates or IMAGENET_TEMPLATES, config.max_templates)
    k = min(top_k or config.top_k, len(labels))
    classes = class_embeddings(text_embedder(encoder), labels, templates, config.prompt_batch)
    identity = {k_: v for k_, v in encoder.identity.items() if k_ != "checkpoint"}
    return LabelSet(labels, templates, identity, k), classes


def check_table_encoder(table: CacheTable, encoder: Any) -> None:
    """Refuse a table whose vectors another encoder made: its labels would be noise."""
    if table.dim != encoder.out_dim:
        raise LabelSetError(
            f"the table's vectors are {table.dim}-d and the encoder's {encoder.out_dim}-d: "
            "classify with the encoder that built the table (--preset / --checkpoint)"
        )
    built = table.metadata.get("encoder")
    if isinstance(built, dict) and built.get("weights") not in (None, encoder.identity["weights"]):
        raise LabelSetError(
            f"the table was embedded with weights {built.get('weights')} and this encoder has "
            f"{encoder.identity['weights']}: classify with the table's encoder"
        )


@dataclass
class ClassifyRun:
    """What a run labels with and where it writes: shared by the local loop and the Ray job."""

    settings: Settings
    table: CacheTable
    label_set: LabelSet
    classes: np.ndarray
    writer: LabelWriter
    started: float

    def rows(self, ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
        ls = self.label_set
        return label_rows(ids, vectors, self.classes, ls.labels, ls.top_k, self.table.version)

    def finish(self, labelled: int, truth_column: str | None) -> ClassifyResult:
        result = ClassifyResult(
            name=self.writer.name,
            table_version=self.table.version,
            labelled=labelled,
            total=len(self.writer.done),
            seconds=time.perf_counter() - self.started,
            label_counts=label_counts(self.settings, self.writer.name),
        )
        if truth_column:
            result.evaluation = evaluate(self.settings, self.writer.name, truth_column)
        return result


def start_run(
    settings: Settings,
    labels: Sequence[str],
    templates: Sequence[str] | None,
    top_k: int | None,
    encoder: Any = None,
    replace: bool = False,
) -> ClassifyRun:
    """Check the label set and the table, build the class matrix, open the side table."""
    started = time.perf_counter()
    if encoder is None:
        from cachebind.encode import Encoder

        encoder = Encoder.from_config(settings.encoder, settings.weights)
    table = CacheTable.open(settings.store)
    check_table_encoder(table, encoder)
    label_set, classes = prepare(encoder, labels, templates, top_k, settings.analysis)
    writer = LabelWriter(settings.store, label_set, replace)
    return ClassifyRun(settings, table, label_set, classes, writer, started)


def classify_table(
    settings: Settings,
    labels: Sequence[str],
    *,
    templates: Sequence[str] | None = None,
    top_k: int | None = None,
    encoder: Any = None,
    truth_column: str | None = None,
    limit: int | None = None,
    replace: bool = False,
) -> ClassifyResult:
    """Label the rows of ``settings.store.table`` not labelled yet; evaluate on request.
    ``replace`` drops the label set's side table first (to relabel with other templates)."""
    run = start_run(settings, labels, templates, top_k, encoder, replace)
    labelled = 0
    batches = iter_unlabelled(run.table, run.writer.done, settings.analysis.batch_rows, limit=limit)
    for ids, vectors, _ in batches:
        labelled += run.writer.append(run.rows(ids, vectors))
    return run.finish(labelled, truth_column)


def label_counts(settings: Settings, name: str) -> dict[str, int]:
    side = open_side_table(settings.store, name).to_lance()
    counts = pc.value_counts(side.to_table(columns=["label"])["label"])
    return {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}


def evaluate(settings: Settings, name: str, column: str) -> Evaluation:
    """Accuracy and confusion of the side table ``name`` against the images table's ``column``.

    Reads both tables in batches: the side table's ids and label codes (12 bytes a row) are held,
    the images table streams. Truth values that are not labels get rows of their own after the
    labels' (every such row counts as wrong).
    """
    side_handle = open_side_table(settings.store, name)
    labels = list(side_metadata(side_handle.schema)["labels"])
    table = CacheTable.open(settings.store)
    if column not in table.dataset.schema.names or column in ("vector", "thumbnail"):
        raise LabelSetError(f"the table has no ground-truth column {column!r}")
    kind = table.dataset.schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and not (
        pa.types.is_integer(kind)
    ):
        raise LabelSetError(
            f"ground-truth column {column!r} holds {kind}: it must hold text or integers"
        )
    side = side_handle.to_lance().to_table(columns=["id", "label"])
    order = np.argsort(side["id"].to_numpy(), kind="stable")
    side_ids = side["id"].to_numpy()[order]
    codes = pc.index_in(side["label"], pa.array(labels)).to_numpy(zero_copy_only=False)[order]
    pairs: Counter[tuple[str, int]] = Counter()
    for batch in table.dataset.to_batches(
        columns=["id", column], batch_size=settings.analysis.batch_rows
    ):
        if not len(side_ids):
            break
        ids = batch.column("id").to_numpy()
        pos = np.searchsorted(side_ids, ids).clip(max=len(side_ids) - 1)
        truth = pd.Series(batch.column(column).cast(pa.string()).to_pandas())
        keep = (side_ids[pos] == ids) & truth.notna().to_numpy()
        frame = pd.DataFrame({"truth": truth[keep].to_numpy(), "code": codes[pos[keep]]})
        pairs.update(frame.value_counts().to_dict())
    extra = sorted({t for t, _ in pairs} - set(labels))
    confusion = pd.DataFrame(
        0, index=pd.Index(labels + extra, name=column), columns=labels, dtype=np.int64
    )
    for (truth_value, code), n in pairs.items():
        confusion.iloc[confusion.index.get_loc(truth_value), int(code)] += n
    total = int(confusion.to_numpy().sum())
    correct = int(np.trace(confusion.to_numpy()[: len(labels)]))
    return Evaluation(column, total, correct / total if total else float("nan"), confusion)
