// The generate view: POST /v1/generate with the query's inputs as visual context, its
// server-sent events read from the response body as they arrive (EventSource cannot POST).
"use strict";

function parseEvents(buffer, onEvent) {
  const blocks = buffer.split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) event = line.slice(7);
      else if (line.startsWith("data: ")) data.push(line.slice(6));
    }
    if (data.length) onEvent(event, JSON.parse(data.join("\n")));
  }
  return rest;
}

async function runGenerate() {
  const button = $("#generate");
  button.disabled = true;
  const output = $("#generate-text");
  output.textContent = "";
  delete output.dataset.done;
  $("#generate-neighbours").replaceChildren();
  try {
    const body = { prompt: $("#generate-prompt").value, inputs: await collectInputs(), stream: true };
    setStatus("generating…");
    const response = await fetch("/v1/generate", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const payload = await response.json().catch(() => ({}));
      throw new Error(`${response.status} ${payload.error || "error"}: ${payload.detail || ""}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + value, (event, data) => {
        if (event === "neighbours") {
          const items = data.neighbours.map((n) => {
            const item = document.createElement("li");
            item.textContent = `${n.caption || n.key} (cosine ${n.similarity.toFixed(3)}, weight ${n.weight.toFixed(3)})`;
            return item;
          });
          $("#generate-neighbours").replaceChildren(...items);
        } else if (event === "message") {
          output.textContent += data.text;
        } else if (event === "done") {
          output.textContent = data.text;
          output.dataset.done = "true";
        } else if (event === "error") {
          throw new Error(`generation failed: ${data.detail}`);
        }
      });
    }
    setStatus("generated");
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#show-generate").addEventListener("click", () => {
    $("#generate-view").hidden = false;
    $("#generate-prompt").focus();
  });
  $("#generate").addEventListener("click", runGenerate);
});
