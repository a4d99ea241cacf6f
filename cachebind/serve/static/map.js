// The map of the collection (GET /v1/map): one dot per row on a canvas, coloured by its
// zero-shot label; a click opens the nearest row. Loaded after app.js and workbench.js.
"use strict";

const MAP_PAD = 12; // pixels between the outermost dots and the canvas edge
const MAP_HIT = 8; // a click selects the nearest dot within this many pixels
const PALETTE = ["#2f6fed", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0c8599",
  "#e67700", "#5c940d", "#a61e4d", "#364fc7"];
const mapState = { px: [], py: [], ids: [], labels: [] };

// Uniform scale, y up: the layout's aspect ratio is kept.
function mapTransform(xs, ys, width, height) {
  const xmin = Math.min(...xs), xmax = Math.max(...xs);
  const ymin = Math.min(...ys), ymax = Math.max(...ys);
  const scale = Math.min((width - 2 * MAP_PAD) / (xmax - xmin || 1),
    (height - 2 * MAP_PAD) / (ymax - ymin || 1));
  return [(x) => MAP_PAD + (x - xmin) * scale, (y) => height - MAP_PAD - (y - ymin) * scale];
}

function drawMap(data) {
  const canvas = $("#map-canvas");
  canvas.width = Math.max(280, canvas.parentElement.clientWidth);
  canvas.height = Math.round(canvas.width * 0.7);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const [tx, ty] = mapTransform(data.x, data.y, canvas.width, canvas.height);
  const labels = data.labels || data.ids.map(() => null);
  const names = [...new Set(labels.filter((l) => l !== null))].sort();
  const colour = (label) => (label === null ? "#8a93a3" : PALETTE[names.indexOf(label) % PALETTE.length]);
  mapState.px = data.x.map(tx);
  mapState.py = data.y.map(ty);
  mapState.ids = data.ids;
  mapState.labels = labels;
  for (let i = 0; i < data.ids.length; i++) {
    ctx.fillStyle = colour(labels[i]);
    ctx.fillRect(mapState.px[i] - 2, mapState.py[i] - 2, 4, 4);
  }
  const counts = new Map();
  for (const label of labels) counts.set(label, (counts.get(label) || 0) + 1);
  const legend = [...counts.entries()].map(([label, n]) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(label);
    item.append(swatch, `${label === null ? "unlabelled" : label} (${n})`);
    return item;
  });
  $("#map-legend").replaceChildren(...legend);
  canvas.dataset.points = String(data.ids.length);
}

function nearestPoint(x, y) {
  let best = -1;
  let bestDistance = MAP_HIT * MAP_HIT;
  for (let i = 0; i < mapState.ids.length; i++) {
    const d = (mapState.px[i] - x) ** 2 + (mapState.py[i] - y) ** 2;
    if (d <= bestDistance) {
      best = i;
      bestDistance = d;
    }
  }
  return best;
}

async function showMap() {
  const table = $("#label-table").value.trim();
  try {
    setStatus("loading the map…");
    const data = await api(`/v1/map${table ? `?labels=${encodeURIComponent(table)}` : ""}`);
    $("#map-view").hidden = false;
    drawMap(data);
    $("#map-summary").textContent =
      `${data.count} rows · ${data.method} · table version ${data.table_version}` +
      (data.table_version !== data.served_version ? ` (served: ${data.served_version})` : "");
    setStatus(`map of ${data.count} rows`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#show-map").addEventListener("click", showMap);
  $("#map-canvas").addEventListener("click", (event) => {
    const rect = event.target.getBoundingClientRect();
    const scaleX = event.target.width / rect.width;
    const scaleY = event.target.height / rect.height;
    const i = nearestPoint((event.clientX - rect.left) * scaleX, (event.clientY - rect.top) * scaleY);
    if (i >= 0) openDetail(mapState.ids[i], mapState.labels[i] || "", "from the map");
  });
});
