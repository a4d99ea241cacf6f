// The map of the collection (GET /v1/map): one dot per row on a canvas, coloured by its
// zero-shot label, its shard or a caption word; a click opens the nearest row, the wheel zooms
// around the cursor and a drag pans. The query is placed by the layout model stored with the
// map (POST /v1/map/place). Loaded after app.js and workbench.js.
"use strict";

const MAP_PAD = 12; // pixels between the outermost dots and the canvas edge
const MAP_HIT = 8; // a click selects the nearest dot within this many pixels
const PALETTE = ["#2f6fed", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0c8599",
  "#e67700", "#5c940d", "#a61e4d", "#364fc7"];
const MAP_ZOOM = [1, 400]; // the view's scale stays within these (1: the whole map)
const MAP_WHEEL_RATE = 0.0015; // zoom factor per wheel delta unit, exp(-rate * deltaY)
const MAP_KEY_ZOOM = 1.5; // one + or - key press
const MAP_DRAG_SLOP = 3; // pixels a press may move and still count as a click
const mapState = {
  // bx, by: each dot in canvas pixels at zoom 1; px, py: where the current view draws it
  // (every hit test, the lasso and the arrow keys read px, py, so they work zoomed in).
  bx: [], by: [], px: [], py: [], ids: [], labels: [], colours: [], selected: [], drag: null,
  view: { k: 1, ox: 0, oy: 0 }, // drawn = base * k + offset
  pan: null, // a drag in progress: where it started and the offset then
  panned: false, // the press that just ended moved the view: it is not a click
  layout: null, // [tx, ty]: layout coordinates to canvas pixels at zoom 1
  queryBase: null, // the query at zoom 1, or null
  queryLayout: null, // the query in layout coordinates, as POST /v1/map/place gave it
  placedFor: null, // the search body the query was placed for
  at: new Map(), // row id -> its index on the map
  results: [], // indices of the current results that the map holds
  query: null, // [x, y] in canvas pixels in the current view, or null
  focus: -1, // the point the arrow keys are on (-1: none yet)
};
// Above this many dots one fillRect each costs a second a frame (1M, headless Chromium): the
// map is painted as a density image instead, each dot a 2x2 cell of its colour whose opacity
// grows with the dots that share the cell.
const MAP_DENSITY_ABOVE = 50_000;
const ARROWS = { ArrowRight: [1, 0], ArrowLeft: [-1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };

// Uniform scale, y up: the layout's aspect ratio is kept.
function mapTransform(xs, ys, width, height) {
  // A loop, not Math.min(...xs): spreading a million arguments overflows the call stack.
  let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity;
  for (let i = 0; i < xs.length; i++) {
    if (xs[i] < xmin) xmin = xs[i];
    if (xs[i] > xmax) xmax = xs[i];
    if (ys[i] < ymin) ymin = ys[i];
    if (ys[i] > ymax) ymax = ys[i];
  }
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
  mapState.layout = [tx, ty];
  mapState.bx = Float64Array.from(data.x, tx);
  mapState.by = Float64Array.from(data.y, ty);
  mapState.view = { k: 1, ox: 0, oy: 0 };
  mapState.placedFor = null;
  mapState.queryBase = null;
  mapState.ids = data.ids;
  mapState.labels = labels;
  mapState.colours = labels.map(colour);
  mapState.selected = [];
  mapState.at = new Map(data.ids.map((id, i) => [id, i]));
  mapState.focus = -1;
  projectView();
  placeResults();
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

function paintMap(box = null) {
  const canvas = $("#map-canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const chosen = new Set(mapState.selected);
  if (mapState.ids.length > MAP_DENSITY_ABOVE) {
    paintDensity(ctx, canvas.width, canvas.height);
    for (const i of mapState.selected) {
      ctx.fillStyle = mapState.colours[i];
      ctx.fillRect(mapState.px[i] - 3, mapState.py[i] - 3, 6, 6);
    }
  } else {
    for (let i = 0; i < mapState.ids.length; i++) {
      ctx.fillStyle = mapState.colours[i];
      const size = chosen.has(i) ? 6 : 4;
      ctx.fillRect(mapState.px[i] - size / 2, mapState.py[i] - size / 2, size, size);
    }
  }
  ctx.strokeStyle = "#1d2330";
  ctx.lineWidth = 1.5;
  for (const i of mapState.results) {
    ctx.beginPath();
    ctx.arc(mapState.px[i], mapState.py[i], 6, 0, 2 * Math.PI);
    ctx.stroke();
  }
  if (mapState.query) {
    const [qx, qy] = mapState.query;
    ctx.lineWidth = 3;
    ctx.beginPath();
    ctx.moveTo(qx - 9, qy - 9);
    ctx.lineTo(qx + 9, qy + 9);
    ctx.moveTo(qx + 9, qy - 9);
    ctx.lineTo(qx - 9, qy + 9);
    ctx.stroke();
  }
  if (mapState.focus >= 0) {
    ctx.strokeStyle = "#e8590c";
    ctx.lineWidth = 2.5;
    ctx.beginPath();
    ctx.arc(mapState.px[mapState.focus], mapState.py[mapState.focus], 9, 0, 2 * Math.PI);
    ctx.stroke();
  }
  ctx.lineWidth = 1;
  if (box) {
    ctx.strokeStyle = "#1d2330";
    ctx.setLineDash([4, 3]);
    if (box.path) {
      ctx.beginPath();
      box.path.forEach(([x, y], k) => (k ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath();
      ctx.stroke();
    } else {
      ctx.strokeRect(box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0);
    }
    ctx.setLineDash([]);
  }
}

function paintDensity(ctx, width, height) {
  const image = ctx.createImageData(width, height);
  const pixels = image.data;
  const counts = new Uint16Array(width * height);
  const rgb = new Map();
  for (const colour of new Set(mapState.colours)) {
    rgb.set(colour, [1, 3, 5].map((k) => parseInt(colour.slice(k, k + 2), 16)));
  }
  for (let i = 0; i < mapState.ids.length; i++) {
    const x0 = Math.round(mapState.px[i]) - 1, y0 = Math.round(mapState.py[i]) - 1;
    const [r, g, b] = rgb.get(mapState.colours[i]);
    for (let y = Math.max(0, y0); y < Math.min(height, y0 + 2); y++) {
      for (let x = Math.max(0, x0); x < Math.min(width, x0 + 2); x++) {
        const cell = y * width + x;
        const n = Math.min(65535, counts[cell] + 1);
        counts[cell] = n;
        pixels[4 * cell] = r;
        pixels[4 * cell + 1] = g;
        pixels[4 * cell + 2] = b;
        pixels[4 * cell + 3] = Math.min(255, 90 + 40 * n);
      }
    }
  }
  ctx.putImageData(image, 0, 0);
}

function canvasPoint(event) {
  const rect = event.target.getBoundingClientRect();
  return [
    (event.clientX - rect.left) * (event.target.width / rect.width),
    (event.clientY - rect.top) * (event.target.height / rect.height),
  ];
}

// The dots where the current view draws them, the view's scale and offset on the canvas.
function projectView() {
  const { k, ox, oy } = mapState.view;
  const n = mapState.bx.length;
  // Typed arrays written in place: a zoom frame at a million dots allocates nothing.
  if (mapState.px.length !== n) [mapState.px, mapState.py] = [new Float64Array(n), new Float64Array(n)];
  for (let i = 0; i < n; i++) {
    mapState.px[i] = mapState.bx[i] * k + ox;
    mapState.py[i] = mapState.by[i] * k + oy;
  }
  mapState.query = mapState.queryBase
    ? [mapState.queryBase[0] * k + ox, mapState.queryBase[1] * k + oy]
    : null;
  const canvas = $("#map-canvas");
  canvas.dataset.zoom = k.toFixed(4);
  canvas.dataset.offset = `${ox.toFixed(2)},${oy.toFixed(2)}`;
  if (mapState.query) canvas.dataset.query = mapState.query.map((v) => v.toFixed(2)).join(",");
  else delete canvas.dataset.query;
}

// Scale the view by `factor` keeping the canvas point (cx, cy) where it is.
function zoomAt(cx, cy, factor) {
  const { k, ox, oy } = mapState.view;
  const next = Math.min(MAP_ZOOM[1], Math.max(MAP_ZOOM[0], k * factor));
  mapState.view = { k: next, ox: cx - (cx - ox) * (next / k), oy: cy - (cy - oy) * (next / k) };
  projectView();
  paintMap();
}

function resetView() {
  mapState.view = { k: 1, ox: 0, oy: 0 };
  projectView();
  paintMap();
}

// The results shown (in rank order) ringed on the map, and the query placed on it.
function placeResults() {
  const ids = [...document.querySelectorAll("#results .result")].map((card) => card.dataset.id);
  mapState.results = ids.map((id) => mapState.at.get(id)).filter((i) => i !== undefined);
  const canvas = $("#map-canvas");
  canvas.dataset.results = String(mapState.results.length);
  paintMap();
  placeQuery();
}

// Where the current search's query lands, by the layout model fitted with the map: asked once
// per query (and again when the map is redrawn); an answer for an older query is dropped.
async function placeQuery() {
  const body = state.body; // app.js: the query of the results shown
  if (!body || !mapState.ids.length || mapState.placedFor === body) return;
  mapState.placedFor = body;
  const canvas = $("#map-canvas");
  try {
    const placed = await api("/v1/map/place", { inputs: body.inputs });
    if (state.body !== body || mapState.placedFor !== body) return;
    const [tx, ty] = mapState.layout;
    mapState.queryLayout = [placed.x, placed.y];
    mapState.queryBase = [tx(placed.x), ty(placed.y)];
    canvas.dataset.queryLayout = `${placed.x},${placed.y}`;
    delete canvas.dataset.queryError;
  } catch (error) {
    if (state.body !== body) return;
    mapState.queryBase = null;
    delete canvas.dataset.queryLayout;
    canvas.dataset.queryError = error.message;
  }
  projectView();
  paintMap();
}

// Even-odd ray casting: is (x, y) inside the closed polygon `path`?
function insidePolygon(x, y, path) {
  let inside = false;
  for (let a = 0, b = path.length - 1; a < path.length; b = a++) {
    const [xa, ya] = path[a], [xb, yb] = path[b];
    if ((ya > y) !== (yb > y) && x < ((xb - xa) * (y - ya)) / (yb - ya) + xa) inside = !inside;
  }
  return inside;
}

// Shift + drag draws a box, or a freeform lasso when "select with" says so; the dots inside it
// are the selection "Export selection" writes.
function selectInside(drag) {
  const [xa, xb] = [Math.min(drag.x0, drag.x1), Math.max(drag.x0, drag.x1)];
  const [ya, yb] = [Math.min(drag.y0, drag.y1), Math.max(drag.y0, drag.y1)];
  const inside = drag.path
    ? (x, y) => insidePolygon(x, y, drag.path)
    : (x, y) => x >= xa && x <= xb && y >= ya && y <= yb;
  mapState.selected = [];
  for (let i = 0; i < mapState.ids.length; i++) {
    if (inside(mapState.px[i], mapState.py[i])) mapState.selected.push(i);
  }
  const n = mapState.selected.length;
  $("#map-export").disabled = n === 0;
  $("#map-selection").textContent = n ? `${n} selected` : "shift + drag to select";
  $("#map-canvas").dataset.selected = String(n);
  paintMap();
}

async function exportSelection() {
  const ids = mapState.selected.map((i) => mapState.ids[i]);
  try {
    const response = await fetch("/v1/export", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ ids, format: "parquet" }),
    });
    if (!response.ok) {
      const payload = await response.json().catch(() => ({}));
      throw new Error(`${response.status} ${payload.error || "error"}: ${payload.detail || ""}`);
    }
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = "cachebind-map-selection.parquet";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
    setStatus(`exported ${ids.length} rows of the map as Parquet`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

// The next point in an arrow's direction: ahead of the focus, nearest along the arrow, with
// sideways distance counting double so that the ring moves roughly where the arrow points.
// The first press lands on the point nearest the canvas centre.
function stepFocus(key) {
  const canvas = $("#map-canvas");
  const from = mapState.focus;
  let next = -1;
  if (from < 0) {
    let best = Infinity;
    for (let i = 0; i < mapState.ids.length; i++) {
      const d = (mapState.px[i] - canvas.width / 2) ** 2 + (mapState.py[i] - canvas.height / 2) ** 2;
      if (d < best) [best, next] = [d, i];
    }
  } else {
    const [dx, dy] = ARROWS[key];
    let best = Infinity;
    for (let i = 0; i < mapState.ids.length; i++) {
      const ox = mapState.px[i] - mapState.px[from], oy = mapState.py[i] - mapState.py[from];
      const ahead = ox * dx + oy * dy;
      if (ahead <= 0) continue;
      const cost = ahead + 2 * Math.abs(ox * dy - oy * dx);
      if (cost < best) [best, next] = [cost, i];
    }
  }
  if (next < 0) return; // nothing further that way: the ring stays
  mapState.focus = next;
  canvas.dataset.focus = mapState.ids[next];
  $("#map-selection").textContent = `on ${mapState.labels[next] || "a row"} · Enter opens it`;
  paintMap();
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

// The `color` parameter of GET /v1/map for the page's choice ("" colours nothing).
function mapColouring() {
  const kind = $("#map-colour").value;
  if (kind === "shard") return "shard";
  if (kind === "word") {
    const word = $("#map-word").value.trim();
    return word ? `word:${word}` : "";
  }
  const table = $("#label-table").value.trim();
  return table ? `label:${table}` : "";
}

async function showMap() {
  const colouring = mapColouring();
  try {
    setStatus("loading the map…");
    const data = await api(`/v1/map${colouring ? `?color=${encodeURIComponent(colouring)}` : ""}`);
    $("#map-view").hidden = false;
    drawMap(data);
    $("#map-canvas").dataset.colour = data.color || "";
    $("#map-summary").textContent =
      `${data.count} rows · ${data.method} · table version ${data.table_version}` +
      (data.table_version !== data.served_version ? ` (served: ${data.served_version})` : "") +
      (data.color ? ` · coloured by ${data.color}` : "");
    setStatus(`map of ${data.count} rows`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#show-map").addEventListener("click", showMap);
  $("#map-recolour").addEventListener("click", showMap);
  // Every search (or "More results") changes the result cards: place them on the map drawn.
  new MutationObserver(() => {
    if (mapState.ids.length) placeResults();
  }).observe($("#results"), { childList: true });
  const canvas = $("#map-canvas");
  canvas.addEventListener("mousedown", (event) => {
    const [x, y] = canvasPoint(event);
    if (!event.shiftKey) {
      const { ox, oy } = mapState.view;
      mapState.pan = { x, y, ox, oy, moved: false };
      return;
    }
    const lasso = $("#map-tool").value === "lasso";
    mapState.drag = { x0: x, y0: y, x1: x, y1: y, path: lasso ? [[x, y]] : null };
  });
  canvas.addEventListener("mousemove", (event) => {
    if (mapState.pan) {
      const [x, y] = canvasPoint(event);
      const pan = mapState.pan;
      pan.moved ||= Math.abs(x - pan.x) + Math.abs(y - pan.y) > MAP_DRAG_SLOP;
      if (!pan.moved) return;
      mapState.view = { ...mapState.view, ox: pan.ox + x - pan.x, oy: pan.oy + y - pan.y };
      projectView();
      paintMap();
      return;
    }
    if (!mapState.drag) return;
    [mapState.drag.x1, mapState.drag.y1] = canvasPoint(event);
    if (mapState.drag.path) mapState.drag.path.push([mapState.drag.x1, mapState.drag.y1]);
    paintMap(mapState.drag);
  });
  canvas.addEventListener("mouseup", (event) => {
    if (mapState.pan) {
      mapState.panned = mapState.pan.moved;
      mapState.pan = null;
      return;
    }
    if (!mapState.drag) return;
    [mapState.drag.x1, mapState.drag.y1] = canvasPoint(event);
    if (mapState.drag.path) mapState.drag.path.push([mapState.drag.x1, mapState.drag.y1]);
    selectInside(mapState.drag);
    mapState.drag = null;
  });
  canvas.addEventListener("click", (event) => {
    if (event.shiftKey) return; // the end of a box selection
    if (mapState.panned) {
      mapState.panned = false; // the end of a drag that panned
      return;
    }
    const [x, y] = canvasPoint(event);
    const i = nearestPoint(x, y);
    if (i >= 0) openDetail(mapState.ids[i], mapState.labels[i] || "", "from the map");
  });
  canvas.addEventListener("mouseleave", () => {
    mapState.pan = null;
  });
  canvas.addEventListener(
    "wheel",
    (event) => {
      if (!mapState.ids.length) return;
      event.preventDefault(); // the wheel zooms the map, not the page
      const [x, y] = canvasPoint(event);
      zoomAt(x, y, Math.exp(-MAP_WHEEL_RATE * event.deltaY));
    },
    { passive: false },
  );
  $("#map-reset").addEventListener("click", resetView);
  $("#map-export").addEventListener("click", exportSelection);
  canvas.addEventListener("keydown", (event) => {
    if (!mapState.ids.length) return;
    if (event.key in ARROWS) {
      event.preventDefault(); // the arrows move the ring, not the page
      stepFocus(event.key);
    } else if (event.key === "+" || event.key === "=" || event.key === "-") {
      event.preventDefault();
      // Around the ring when there is one, else the canvas centre.
      const i = mapState.focus;
      const [cx, cy] = i >= 0 ? [mapState.px[i], mapState.py[i]] : [canvas.width / 2, canvas.height / 2];
      zoomAt(cx, cy, event.key === "-" ? 1 / MAP_KEY_ZOOM : MAP_KEY_ZOOM);
    } else if (event.key === "0") {
      event.preventDefault();
      resetView();
    } else if (event.key === "Enter" && mapState.focus >= 0) {
      event.preventDefault();
      const i = mapState.focus;
      openDetail(mapState.ids[i], mapState.labels[i] || "", "from the map");
    }
  });
});
