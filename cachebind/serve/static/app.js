// cachebind search page: plain JavaScript, no build step. Talks to /v1 with the API key that
// the analyst pastes (kept in localStorage), and fetches thumbnails with that key as blobs.
"use strict";

const KEY_STORAGE = "cachebind.apiKey";
const $ = (selector, root = document) => root.querySelector(selector);

const state = { body: null, cursor: null, objectUrls: [], version: undefined };

function apiKey() {
  return $("#api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, body) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: { ...authHeaders(), ...(body === undefined ? {} : { "Content-Type": "application/json" }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(payload.detail)
      ? payload.detail.map((d) => `${d.loc.join(".")}: ${d.msg}`).join("; ")
      : payload.detail || response.statusText;
    throw new Error(`${response.status} ${payload.error || "error"}: ${detail}`);
  }
  return payload;
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// ---------------------------------------------------------------- inputs

function addInput(modality = "text") {
  const row = $("#input-row").content.firstElementChild.cloneNode(true);
  const select = $(".input-modality", row);
  select.value = modality;
  select.addEventListener("change", () => syncRow(row));
  $(".remove-input", row).addEventListener("click", () => {
    if (document.querySelectorAll(".input-row").length > 1) row.remove();
  });
  $("#inputs").appendChild(row);
  syncRow(row);
  return row;
}

function syncRow(row) {
  const isText = $(".input-modality", row).value === "text";
  $(".input-text", row).hidden = !isText;
  $(".input-file", row).hidden = isText;
  const accept = { image: "image/*", audio: "audio/*", video: "video/*" };
  $(".input-file", row).accept = accept[$(".input-modality", row).value] || "";
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function collectInputs() {
  const items = [];
  for (const row of document.querySelectorAll(".input-row")) {
    const modality = $(".input-modality", row).value;
    const weight = parseFloat($(".input-weight", row).value);
    if (!(weight > 0)) throw new Error("every weight must be a positive number");
    if (modality === "text") {
      const text = $(".input-text", row).value.trim();
      if (text) items.push({ modality, text, weight });
    } else {
      const file = $(".input-file", row).files[0];
      if (file) items.push({ modality, data: await readBase64(file), weight });
    }
  }
  if (!items.length) throw new Error("type a text or choose a file to search with");
  return items;
}

// ---------------------------------------------------------------- results

function clearResults() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  $("#results").replaceChildren();
}

// The card's data-thumb says when its thumbnail is settled ("shown" or "missing"), so a reader
// (or a test) can wait for every card's image without polling the <img> itself.
async function loadThumbnail(card, img, url) {
  try {
    const response = await fetch(url, { headers: authHeaders() });
    if (!response.ok) throw new Error(String(response.status));
    const objectUrl = URL.createObjectURL(await response.blob());
    state.objectUrls.push(objectUrl);
    img.src = objectUrl;
    card.dataset.thumb = "shown";
  } catch {
    img.replaceWith(document.createTextNode("no thumbnail"));
    card.dataset.thumb = "missing";
  }
}

function renderResults(results) {
  for (const hit of results) {
    const card = $("#result-card").content.firstElementChild.cloneNode(true);
    // Row ids are int64, sent as strings: a JavaScript number would lose digits past 2^53.
    card.dataset.id = hit.id;
    $(".caption", card).textContent = hit.caption || "(no caption)";
    $(".score", card).textContent = hit.score.toFixed(4);
    $(".key", card).textContent = hit.key || card.dataset.id;
    const img = $("img", card);
    img.alt = hit.caption || hit.key || "";
    if (hit.width && hit.height) img.title = `${hit.width}×${hit.height}`;
    $("#results").appendChild(card);
    loadThumbnail(card, img, hit.image_url);
  }
}

async function runSearch(more = false) {
  localStorage.setItem(KEY_STORAGE, apiKey());
  const button = $("#search");
  button.disabled = true;
  try {
    if (!more) {
      const body = { inputs: await collectInputs(), k: parseInt($("#k").value, 10) || 10 };
      const filter = $("#filter").value.trim();
      if (filter) body.filter = filter;
      const dedup = parseFloat($("#dedup").value);
      if (dedup > 0) body.dedup = dedup;
      Object.assign(body, labelFilter()); // workbench.js
      state.body = body;
      clearResults();
    }
    setStatus("searching…");
    const request = more ? { ...state.body, cursor: state.cursor } : state.body;
    const started = performance.now();
    const page = await api("/v1/search", request);
    // A newly published version has its own figures: show them with its results.
    if (page.index_version !== state.version) showIndexVersion();
    renderResults(page.results);
    state.cursor = page.next_cursor;
    $("#more").hidden = !page.next_cursor;
    const shown = document.querySelectorAll(".result").length;
    const ms = Math.round(performance.now() - started);
    setStatus(
      `${shown} result${shown === 1 ? "" : "s"} · index ${page.index_version} · ` +
        `${recallText(page.recall)} · ${ms} ms`,
    );
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    button.disabled = false;
  }
}

// What the version's manifest promises for this query's modality (a mix: its worst part).
function recallText(recall) {
  if (!recall || recall.recall_at_10 === null) return "recall not measured for this query";
  const caveats = [];
  if (!recall.trusted) caveats.push("too few queries to trust");
  if (!recall.verified) caveats.push("some inputs unmeasured");
  const note = caveats.length ? `, ${caveats.join(", ")}` : "";
  return `recall@10 ${recall.recall_at_10.toFixed(3)} (${recall.set}${note})`;
}

function figure(value, digits) {
  return value === null || value === undefined ? "—" : value.toFixed(digits);
}

function renderQuerySets(info) {
  const body = $("#query-sets");
  body.replaceChildren();
  for (const set of info.query_sets || []) {
    const row = document.createElement("tr");
    row.dataset.set = set.name;
    if (!set.trusted) {
      row.classList.add("untrusted");
      row.title = "too few queries to stand behind these figures";
    }
    const cells = [
      set.trusted ? set.name : `${set.name} (untrusted)`,
      set.n === null ? "—" : String(set.n),
      figure(set.recall_at_1, 3),
      figure(set.recall_at_10, 3),
      figure(set.recall_at_100, 3),
      figure(set.latency_ms.batch1_p50, 2),
      figure(set.latency_ms.batch64_per_query, 3),
    ];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    body.appendChild(row);
  }
  const log = info.query_log;
  const logged = Object.entries(log.modalities)
    .map(([m, c]) => `${m} ${c.kept}/${c.seen}`)
    .join(", ");
  $("#query-log").textContent = log.enabled
    ? `query log on (embeddings only; kept/seen per modality): ${logged || "empty"}`
    : "query log off";
  $("#index-recall").hidden = !(info.query_sets || []).length;
}

async function showIndexVersion() {
  try {
    const info = await api("/v1/index");
    state.version = info.version;
    $("#index-version").textContent = `index ${info.version} · ${info.rows} rows`;
    renderQuerySets(info);
  } catch {
    $("#index-version").textContent = "";
    $("#index-recall").hidden = true;
  }
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("#api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("#api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, apiKey());
    showIndexVersion();
  });
  $("#add-input").addEventListener("click", () => addInput("image"));
  $("#query").addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch(false);
  });
  $("#more").addEventListener("click", () => runSearch(true));
  addInput("text");
  if (apiKey()) showIndexVersion();
});
