"""The gap report's figures and its self-contained HTML page (plots embedded as base64 PNG).

Figures are built with matplotlib's object API (``Figure``, no pyplot): nothing global is
touched, so a notebook or a server thread can make them side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cachebind.analysis.gap import GapResult

REPORT_DIR = "gap_report"
"""The report's default folder inside ``index.dir``, where the service finds it for the page."""

PROJECTION_POINTS = 1_000
"""Points drawn per cloud in the projection plot (a seeded sample)."""


def shared_bins(*samples: np.ndarray, count: int = 60) -> np.ndarray:
    """Bins spanning every sample, so two histograms on one axis compare bar for bar."""
    values = np.concatenate([np.asarray(x, dtype=np.float64) for x in samples])
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (-1.0, 1.0)
    return np.linspace(lo, hi if hi > lo else lo + 1e-3, count + 1)


def top1_figure(results: list[GapResult]) -> Figure:
    fig = Figure(figsize=(7, 2.6 * max(len(results), 1)), layout="constrained")
    axes = fig.subplots(max(len(results), 1), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, results, strict=False):
        bins = shared_bins(r.before.top1, r.after.top1)
        ax.hist(r.before.top1, bins=bins, alpha=0.6, label="query")
        ax.hist(r.after.top1, bins=bins, alpha=0.6, label="after the cache blend")
        ax.set_title(f"{r.name}: top-1 cosine to the image rows")
        ax.set_xlabel("cosine")
        ax.legend(loc="upper left")
    return fig


def paired_figure(results: list[GapResult]) -> Figure | None:
    paired = [r for r in results if len(r.before.paired)]
    if not paired:
        return None
    fig = Figure(figsize=(7, 2.6 * len(paired)), layout="constrained")
    axes = fig.subplots(len(paired), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, paired, strict=True):
        bins = shared_bins(r.before.paired, r.after.paired)
        ax.hist(r.before.paired, bins=bins, alpha=0.6, label="query")
        ax.hist(r.after.paired, bins=bins, alpha=0.6, label="after the cache blend")
        ax.set_title(f"{r.name}: cosine to its own image")
        ax.set_xlabel("cosine")
        ax.legend(loc="upper left")
    return fig


def projection_figure(results: list[GapResult], images: np.ndarray, seed: int = 0) -> Figure:
    """Images, queries and blended queries on the images' first two principal axes, with the
    centroids joined: the gap vector as an arrow."""
    rng = np.random.default_rng(seed)
    images = np.asarray(images, dtype=np.float64)
    mean = images.mean(0)
    _, _, vt = np.linalg.svd(images[: min(len(images), 5_000)] - mean, full_matrices=False)
    axes2 = vt[:2].T

    def project(x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - mean) @ axes2

    def sample(x: np.ndarray) -> np.ndarray:
        return x if len(x) <= PROJECTION_POINTS else x[rng.choice(len(x), PROJECTION_POINTS)]

    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    xy = project(sample(images))
    ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.4, c="grey", label="image rows")
    centre = project(mean[None])[0]
    for r in results:
        if r.queries_before is None or r.queries_after is None:
            continue
        for vectors, tag in ((r.queries_before, ""), (r.queries_after, " blended")):
            xy = project(sample(vectors))
            pts = ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.4, label=f"{r.name}{tag}")
            c = project(vectors.mean(0, keepdims=True))[0]
            ax.annotate(
                "",
                xy=c,
                xytext=centre,
                arrowprops={"arrowstyle": "->", "color": pts.get_facecolor()[0]},
            )
    ax.scatter(centre[0], centre[1], marker="x", c="black", s=20, label="image centroid")
    ax.set_title("the gap: images and queries on the images' first two principal axes")
    ax.legend(loc="best", fontsize="small", markerscale=3)
    return fig


def gap_figures(results: list[GapResult], images: np.ndarray, seed: int = 0) -> dict[str, Figure]:
    figures = {"top1": top1_figure(results), "projection": projection_figure(results, images, seed)}
    paired = paired_figure(results)
    if paired is not None:
        figures["paired"] = paired
    return figures


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def report_numbers(results: list[GapResult], context: dict[str, Any]) -> dict[str, Any]:
    return {**context, "query_sets": [r.to_dict() for r in results]}


def write_gap_report(
    numbers: dict[str, Any], figures: dict[str, Figure], out_dir: str | Path
) -> dict[str, Path]:
    """``gap.html`` (self-contained), ``gap.json`` and one PNG per figure in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "gap.json"}
    paths["json"].write_text(json.dumps(numbers, indent=2))
    images_html = []
    for name, fig in figures.items():
        data = png_bytes(fig)
        paths[name] = out / f"gap_{name}.png"
        paths[name].write_bytes(data)
        b64 = base64.b64encode(data).decode("ascii")
        images_html.append(f'<figure><img alt="{name}" src="data:image/png;base64,{b64}"></figure>')
    paths["html"] = out / "gap.html"
    paths["html"].write_text(render_html(numbers, images_html))
    return paths


def _fmt(x: Any) -> str:
    return "–" if x is None else f"{x:.4f}" if isinstance(x, float) else html.escape(str(x))


def render_html(numbers: dict[str, Any], figures: list[str]) -> str:
    rows = []
    for qs in numbers["query_sets"]:
        for when in ("before", "after"):
            s = qs[when]
            top1, paired = s["top1"] or {}, s["paired_cosine"] or {}
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{_fmt(v)}</td>"
                    for v in (
                        qs["name"],
                        qs["queries"],
                        "query" if when == "before" else "blended",
                        s["centroid_distance"],
                        top1.get("mean"),
                        top1.get("median"),
                        paired.get("mean"),
                    )
                )
                + "</tr>"
            )
    context = "".join(
        f"<li>{html.escape(str(k))}: {html.escape(json.dumps(v))}</li>"
        for k, v in numbers.items()
        if k != "query_sets"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cachebind: the modality gap</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}}
img{{max-width:100%}}</style></head><body>
<h1>The modality gap</h1>
<ul>{context}</ul>
<table><thead><tr><th>query set</th><th>queries</th><th></th><th>centroid distance</th>
<th>top-1 mean</th><th>top-1 median</th><th>paired cosine mean</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
{"".join(figures)}
</body></html>
"""


def read_gap_report(folder: str | Path) -> dict[str, Any]:
    """A written report's numbers and its PNGs as ``data:`` URLs (FileNotFoundError: none)."""
    out = Path(folder)
    numbers = json.loads((out / "gap.json").read_text())
    figures = {
        png.stem.removeprefix("gap_"): "data:image/png;base64,"
        + base64.b64encode(png.read_bytes()).decode("ascii")
        for png in sorted(out.glob("gap_*.png"))
    }
    return {"numbers": numbers, "figures": figures}
