"""The workbench from Python: each analysis returns DataFrames and matplotlib figures.

from cachebind.config import load_config
from cachebind.analysis import notebook

settings = load_config("cachebind.toml")
labelled = notebook.classify(settings, ["dog", "cat", "boat"])
labelled.frame.head()           # id, key, caption, label, score, top_labels, top_scores
report = notebook.gap_report(settings, groups)   # groups: see docs/analysis.md
report.numbers_frame(); report.figures["top1"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from matplotlib.figure import Figure

from cachebind.analysis.gap import GapResult, QueryGroup, measure_gap
from cachebind.analysis.gap_report import gap_figures, report_numbers, write_gap_report
from cachebind.analysis.labelling import open_side_table
from cachebind.analysis.layout import latest_map_version, read_map
from cachebind.analysis.map_run import compute_map
from cachebind.analysis.sampling import sample_images
from cachebind.analysis.templates import LabelSetError
from cachebind.analysis.zero_shot import ClassifyResult, classify_table
from cachebind.config import Settings
from cachebind.store import CacheTable


@dataclass
class Labelled:
    frame: pd.DataFrame
    """One row per labelled image row: id, key, caption, label, score, top_labels, top_scores."""
    result: ClassifyResult
    confusion_figure: Figure | None = None


def classify(
    settings: Settings,
    labels: Sequence[str],
    *,
    templates: Sequence[str] | None = None,
    top_k: int | None = None,
    truth_column: str | None = None,
    encoder: Any = None,
) -> Labelled:
    """Label the table (resuming a side table already there) and read the labels back."""
    result = classify_table(
        settings,
        labels,
        templates=templates,
        top_k=top_k,
        truth_column=truth_column,
        encoder=encoder,
    )
    side = open_side_table(settings.store, result.name).to_lance().to_table().to_pandas()
    rows = CacheTable.open(settings.store).dataset.to_table(columns=["id", "key", "caption"])
    frame = rows.to_pandas().merge(side.drop(columns=["table_version"]), on="id")
    figure = None
    if result.evaluation is not None:
        figure = confusion_figure(result.evaluation.confusion)
    return Labelled(frame, result, figure)


def confusion_figure(confusion: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(1.2 + 0.5 * confusion.shape[1], 1.2 + 0.5 * confusion.shape[0]))
    ax = fig.subplots()
    ax.imshow(confusion.to_numpy(), cmap="Blues")
    ax.set_xticks(range(confusion.shape[1]), [str(c) for c in confusion.columns], rotation=90)
    ax.set_yticks(range(confusion.shape[0]), [str(i) for i in confusion.index])
    ax.set_xlabel("zero-shot label")
    ax.set_ylabel(str(confusion.index.name or "truth"))
    fig.set_layout_engine("constrained")
    return fig


@dataclass
class GapReport:
    results: list[GapResult]
    numbers: dict[str, Any]
    figures: dict[str, Figure]
    paths: dict[str, Path] = field(default_factory=dict)

    def numbers_frame(self) -> pd.DataFrame:
        """One row per query set and stage (query / blended)."""
        rows = []
        for r in self.results:
            for stage, stats in (("query", r.before), ("blended", r.after)):
                s = stats.summary()
                top1, paired = s["top1"] or {}, s["paired_cosine"] or {}
                rows.append(
                    {
                        "query_set": r.name,
                        "stage": stage,
                        "queries": r.queries,
                        "centroid_distance": s["centroid_distance"],
                        "top1_mean": top1.get("mean"),
                        "top1_median": top1.get("median"),
                        "paired_cosine_mean": paired.get("mean"),
                    }
                )
        return pd.DataFrame(rows)


def gap_report(
    settings: Settings, groups: list[QueryGroup], *, out_dir: str | Path | None = None
) -> GapReport:
    """Measure the gap of ``groups`` against a sample of the image rows, before and after the
    blend with the served ``cache`` settings; with ``out_dir``, also write gap.html, gap.json
    and the PNGs. ``indexing.quality.gapsets.known_query_groups`` gives the index's query sets."""
    if not groups:
        raise LabelSetError(
            "no query set to measure: the table has no caption embeddings (embed "
            "--caption-embeddings), the index directory no query log, and no --queries file"
        )
    table = CacheTable.open(settings.store)
    cfg = settings.analysis
    positions, images = sample_images(table, cfg.gap_images, cfg.seed)
    c = settings.cache
    results = measure_gap(groups, images, k=c.k, t=c.t, alpha=c.alpha, image_positions=positions)
    context = {
        "table": settings.store.table,
        "table_version": table.version,
        "image_rows": int(len(images)),
        "table_rows": table.count(),
        "blend": {"k": c.k, "t": c.t, "alpha": c.alpha},
    }
    figures = gap_figures(results, images, cfg.seed)
    report = GapReport(results, report_numbers(results, context), figures)
    if out_dir is not None:
        report.paths = write_gap_report(report.numbers, figures, out_dir)
    return report


@dataclass
class MapView:
    frame: pd.DataFrame
    """id, x, y (and label), one row per placed table row."""
    figure: Figure
    table_version: int
    method: str | None


def collection_map(
    settings: Settings,
    *,
    labels_table: str | None = None,
    compute: bool = False,
    method: Literal["umap", "pca"] | None = None,
) -> MapView:
    """The stored map of the current table version (computed first when ``compute`` or when
    there is none), as a DataFrame and a scatter figure coloured by zero-shot label."""
    version = CacheTable.open(settings.store).version
    if compute or latest_map_version(settings.store, version) != version:
        compute_map(settings, method)
    found = read_map(settings.store, version, labels_table=labels_table)
    frame = found.points.to_pandas()
    return MapView(frame, map_figure(frame), found.table_version, found.method)


def map_figure(frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    if "label" in frame.columns:
        for label, part in frame.groupby(frame["label"].fillna("(unlabelled)")):
            ax.scatter(part["x"], part["y"], s=3, alpha=0.6, label=str(label))
        ax.legend(loc="best", fontsize="small", markerscale=4)
    else:
        ax.scatter(frame["x"], frame["y"], s=3, alpha=0.6)
    ax.set_title("the collection")
    return fig
