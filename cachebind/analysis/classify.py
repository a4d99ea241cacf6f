"""Zero-shot labels the CLIP way: class embeddings from prompt ensembles, each row's best labels.

A class's embedding is the mean of the L2-normalised text embeddings of its prompts (one per
template, ``{}`` replaced by the label), normalised again; a vector takes the labels of highest
cosine. The same two functions serve a table (:mod:`cachebind.analysis.labelling`), the Ray job
and ``POST /v1/classify``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from cachebind.analysis.templates import fill

EmbedTexts = Callable[[list[str]], np.ndarray]
"""Unit-norm text embeddings ``[n, d]`` of ``n`` strings (the encoder's text branch)."""

SCORE_CHUNK = 8_192
"""Rows scored at a time: bounds the [rows, labels] score matrix whatever the batch size."""


def prompts_of(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every label's prompts, label-major: label 0's templates, then label 1's, ..."""
    return [fill(t, label) for label in labels for t in templates]


def class_embeddings(
    embed_texts: EmbedTexts,
    labels: Sequence[str],
    templates: Sequence[str],
    batch: int = 256,
) -> np.ndarray:
    """``[len(labels), d]`` float32: each label's prompt embeddings averaged, then normalised."""
    prompts = prompts_of(labels, templates)
    parts = [embed_texts(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
    return ensemble(np.concatenate(parts), len(labels), len(templates))


def ensemble(prompt_vectors: np.ndarray, labels: int, templates: int) -> np.ndarray:
    """Class embeddings ``[labels, d]`` from label-major prompt embeddings ``[labels *
    templates, d]``: each normalised, averaged per label, the mean normalised again."""
    emb = np.asarray(prompt_vectors, dtype=np.float64)
    # The encoder's rows are unit-norm already; normalising again keeps the recipe exact for
    # any caller's embeddings.
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    means = emb.reshape(labels, templates, -1).mean(axis=1)
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def top_labels(vectors: np.ndarray, classes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(label indices int32 [n, k], cosines float32 [n, k]) of each row, best first.

    Rows are normalised here (cached float16 vectors are unit-norm only to ~1e-3); a zero row
    scores 0 against every label. Ties go to the earlier label.
    """
    k = min(k, len(classes))
    n = len(vectors)
    out_idx = np.empty((n, k), dtype=np.int32)
    out_score = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, SCORE_CHUNK):
        chunk = np.asarray(vectors[start : start + SCORE_CHUNK], dtype=np.float32)
        norms = np.linalg.norm(chunk, axis=1, keepdims=True)
        unit = np.divide(chunk, norms, out=np.zeros_like(chunk), where=norms > 0)
        scores = unit @ classes.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out_idx[start : start + len(chunk)] = order
        out_score[start : start + len(chunk)] = np.take_along_axis(scores, order, axis=1)
    return out_idx, out_score


LABELS_SCHEMA_FIELDS = [
    pa.field("id", pa.int64(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("top_labels", pa.list_(pa.string()), nullable=False),
    pa.field("top_scores", pa.list_(pa.float32()), nullable=False),
    pa.field("table_version", pa.int64(), nullable=False),
]
"""A label side table's columns: the best label and its cosine, the top-k (best first) and the
images-table version the row's vector was read from."""


def label_rows(
    ids: np.ndarray,
    vectors: np.ndarray,
    classes: np.ndarray,
    labels: Sequence[str],
    k: int,
    table_version: int,
) -> pa.Table:
    """The side-table rows of ``ids`` (columns as :data:`LABELS_SCHEMA_FIELDS`)."""
    idx, scores = top_labels(vectors, classes, k)
    names = np.asarray(labels, dtype=object)
    kk = idx.shape[1]
    offsets = pa.array(np.arange(0, len(ids) * kk + 1, kk, dtype=np.int32))
    return pa.table(
        {
            "id": pa.array(np.asarray(ids, dtype=np.int64)),
            "label": pa.array(names[idx[:, 0]] if len(ids) else [], pa.string()),
            "score": pa.array(scores[:, 0] if len(ids) else [], pa.float32()),
            "top_labels": pa.ListArray.from_arrays(
                offsets, pa.array(names[idx].ravel() if len(ids) else [], pa.string())
            ),
            "top_scores": pa.ListArray.from_arrays(offsets, pa.array(scores.ravel())),
            "table_version": pa.array(np.full(len(ids), table_version, dtype=np.int64)),
        },
        schema=pa.schema(LABELS_SCHEMA_FIELDS),
    )
