// The workbench views beside search (plain JavaScript, loaded after app.js, whose helpers
// $, api, authHeaders, setStatus, state, clearResults, renderResults, collectInputs and
// readBase64 it uses): a result's detail with "more like this", keyboard access to the
// results, CSV export of the results shown, the enhance view and the zero-shot label filter.
"use strict";

// Called by app.js when it builds a search body.
function labelFilter() {
  const table = $("#label-table").value.trim();
  const labels = $("#label-filter")
    .value.split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  return table && labels.length ? { label_filter: { table, labels } } : {};
}

// ---------------------------------------------------------------- detail

const detail = { objectUrl: null, blob: null };

async function openDetail(id, caption, meta) {
  const dialog = $("#detail");
  dialog.dataset.id = id;
  dialog.dataset.thumb = "";
  $("#detail-caption").textContent = caption || "(no caption)";
  $("#detail-meta").textContent = meta ? `${meta} · id ${id}` : `id ${id}`;
  const img = $("#detail-img");
  img.removeAttribute("src");
  img.alt = caption || `row ${id}`;
  if (detail.objectUrl) URL.revokeObjectURL(detail.objectUrl);
  detail.objectUrl = null;
  detail.blob = null;
  if (!dialog.open) dialog.showModal();
  try {
    const response = await fetch(`/v1/images/${id}`, { headers: authHeaders() });
    if (!response.ok) throw new Error(String(response.status));
    detail.blob = await response.blob();
    detail.objectUrl = URL.createObjectURL(detail.blob);
    img.src = detail.objectUrl;
    dialog.dataset.thumb = "shown";
  } catch {
    dialog.dataset.thumb = "missing";
  }
  $("#more-like-this").disabled = !detail.blob;
}

function openCard(card) {
  openDetail(
    card.dataset.id,
    $(".caption", card).textContent,
    `score ${$(".score", card).textContent} · ${$(".key", card).textContent}`,
  );
}

// The row's thumbnail is the query: the API has no route that returns a row's vector.
async function moreLikeThis() {
  if (!detail.blob) return;
  const id = $("#detail").dataset.id;
  const data = await readBase64(detail.blob);
  $("#detail").close();
  const body = { inputs: [{ modality: "image", data, weight: 1 }], k: parseInt($("#k").value, 10) || 10 };
  state.body = body;
  clearResults();
  setStatus("searching…");
  try {
    const page = await api("/v1/search", body);
    renderResults(page.results);
    state.cursor = page.next_cursor;
    $("#more").hidden = !page.next_cursor;
    setStatus(`${page.results.length} results like row ${id} (its thumbnail as the query)`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

// ---------------------------------------------------------------- export

// A cell that a spreadsheet would run as a formula is written as text.
function csvCell(value) {
  let text = value === null || value === undefined ? "" : String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\n\r]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function exportCsv() {
  const cards = document.querySelectorAll("#results .result");
  if (!cards.length) {
    setStatus("nothing to export: search first", true);
    return;
  }
  const lines = [["rank", "id", "key", "caption", "score"].join(",")];
  cards.forEach((card, i) => {
    const cells = [i + 1, card.dataset.id, $(".key", card).textContent,
      $(".caption", card).textContent, $(".score", card).textContent];
    lines.push(cells.map(csvCell).join(","));
  });
  const url = URL.createObjectURL(new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = "cachebind-results.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
  setStatus(`exported ${cards.length} results as CSV`);
}

// The service writes the Parquet file (the page has no Parquet writer of its own).
async function exportParquet() {
  const ids = [...document.querySelectorAll("#results .result")].map((c) => c.dataset.id);
  if (!ids.length) {
    setStatus("nothing to export: search first", true);
    return;
  }
  try {
    const response = await fetch("/v1/export", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ ids, format: "parquet" }),
    });
    if (!response.ok) throw new Error(`${response.status} export failed`);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = "cachebind-results.parquet";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
    setStatus(`exported ${ids.length} results as Parquet`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

// ---------------------------------------------------------------- enhance

function cellRow(values) {
  const row = document.createElement("tr");
  for (const value of values) {
    const cell = document.createElement("td");
    cell.textContent = value;
    row.appendChild(cell);
  }
  return row;
}

async function runEnhance() {
  const button = $("#enhance");
  button.disabled = true;
  try {
    const k = parseInt($("#k").value, 10) || 10;
    setStatus("enhancing…");
    const enhanced = await api("/v1/enhance", { inputs: await collectInputs() });
    const rows = enhanced.neighbours.map((n, i) =>
      cellRow([String(i + 1), n.caption || n.key || "", n.similarity.toFixed(4), n.weight.toFixed(4)]),
    );
    $("#enhance-neighbours").replaceChildren(...rows);
    const page = await api("/v1/search", { inputs: [{ embedding: enhanced.embedding }], k });
    const items = page.results.map((hit) => {
      const item = document.createElement("li");
      item.textContent = `${hit.caption || hit.key} (${hit.score.toFixed(4)})`;
      return item;
    });
    $("#enhance-results").replaceChildren(...items);
    $("#enhance-summary").textContent =
      `k ${enhanced.k} · t ${enhanced.t} · alpha ${enhanced.alpha} · ` +
      `cosine(F, F~) ${enhanced.cosine_to_query.toFixed(4)} · index ${enhanced.index_version}`;
    $("#enhance-view").hidden = false;
    setStatus(`enhanced with ${enhanced.neighbours.length} neighbours`);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  const results = $("#results");
  results.addEventListener("click", (event) => {
    const card = event.target.closest(".result");
    if (card) openCard(card);
  });
  results.addEventListener("keydown", (event) => {
    const card = event.target.closest(".result");
    if (card && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      openCard(card);
    }
  });
  $("#more-like-this").addEventListener("click", moreLikeThis);
  $("#export-csv").addEventListener("click", exportCsv);
  $("#export-parquet").addEventListener("click", exportParquet);
  $("#enhance").addEventListener("click", runEnhance);
});
