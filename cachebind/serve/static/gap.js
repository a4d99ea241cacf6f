// The modality-gap view: the last `cachebind report gap` (GET /v1/reports/gap), its numbers
// per query set before and after the blend, and its plots.
"use strict";

function gapFigure(value) {
  return value === null || value === undefined ? "—" : value.toFixed(4);
}

async function showGap() {
  try {
    setStatus("loading the gap report…");
    const report = await api("/v1/reports/gap");
    const numbers = report.numbers;
    const rows = [];
    for (const set of numbers.query_sets) {
      for (const [stage, stats] of [["query", set.before], ["blended", set.after]]) {
        rows.push(cellRow([set.name, stage, String(set.queries),
          gapFigure(stats.centroid_distance), gapFigure(stats.top1 && stats.top1.mean),
          gapFigure(stats.paired_cosine && stats.paired_cosine.mean)]));
      }
    }
    $("#gap-rows").replaceChildren(...rows);
    const images = Object.entries(report.figures).map(([name, url]) => {
      const img = document.createElement("img");
      img.src = url;
      img.alt = `gap report: ${name}`;
      return img;
    });
    $("#gap-figures").replaceChildren(...images);
    const blend = numbers.blend;
    $("#gap-summary").textContent =
      `table ${numbers.table} version ${numbers.table_version} · ${numbers.image_rows} image rows · ` +
      `blend k ${blend.k}, t ${blend.t}, alpha ${blend.alpha}`;
    $("#gap-view").hidden = false;
    setStatus(`gap report of ${numbers.query_sets.length} query sets`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#show-gap").addEventListener("click", showGap);
});
