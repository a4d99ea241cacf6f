"""The map page with a million points in headless Chromium (a benchmark, not a test).

Serves the page's static files on 127.0.0.1, generates ``--points`` clustered 2-D points in the
page itself (no million-row JSON over the wire: what is measured is the page), and records:

- first draw: ``drawMap`` (transform, colours, legend, paint) until the next animation frame;
- repaint: one ``paintMap`` of every dot, median of ``--frames``;
- zoom frame: one wheel step's ``zoomAt`` (every dot moved to the new view, then painted),
  the cost of a pan or zoom frame, median of ``--frames``.

    python benchmarks/bench_map_page.py --points 1000000
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

SERVE = Path(__file__).resolve().parents[1] / "cachebind" / "serve"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run"]

GENERATE = """(n) => {
  // Ten Gaussian clusters, labelled by cluster, as a zero-shot colouring would be.
  let seed = 7; // mulberry32: 32-bit integer steps, exact in JavaScript numbers
  const rand = () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const x = new Array(n), y = new Array(n), ids = new Array(n), labels = new Array(n);
  for (let i = 0; i < n; i++) {
    const c = i % 10;
    const r = Math.sqrt(-2 * Math.log(rand() + 1e-12)), a = 2 * Math.PI * rand();
    x[i] = 6 * Math.cos(c) + r * Math.cos(a);
    y[i] = 6 * Math.sin(c) + r * Math.sin(a);
    ids[i] = String(1e12 + i);
    labels[i] = `label ${c}`;
  }
  window.benchData = { x, y, ids, labels, count: n, method: "pca", table_version: 1,
    served_version: 1, color: "label:bench" };
}"""

FIRST_DRAW = """async () => {
  $("#map-view").hidden = false;
  const started = performance.now();
  drawMap(window.benchData);
  await new Promise((done) => requestAnimationFrame(() => done()));
  return performance.now() - started;
}"""

REPAINT = """async (frames) => {
  const times = [];
  for (let f = 0; f < frames; f++) {
    const started = performance.now();
    paintMap();
    await new Promise((done) => requestAnimationFrame(() => done()));
    times.push(performance.now() - started);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}"""


ZOOM = """async (frames) => {
  const canvas = $("#map-canvas");
  const times = [];
  for (let f = 0; f < frames; f++) {
    const started = performance.now();
    zoomAt(canvas.width / 2, canvas.height / 2, f % 2 ? 1 / 1.2 : 1.2);
    await new Promise((done) => requestAnimationFrame(() => done()));
    times.push(performance.now() - started);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        """Only the figures go to stdout/stderr."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--screenshot", type=Path, help="a PNG of the drawn map, to look at")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    handler = functools.partial(QuietHandler, directory=str(SERVE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as pw:
            chromium = shutil.which("chromium") or "/usr/bin/chromium"
            browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/static/index.html")
            page.evaluate(GENERATE, args.points)
            first = page.evaluate(FIRST_DRAW)
            drawn = int(page.get_attribute("#map-canvas", "data-points"))
            repaint = page.evaluate(REPAINT, args.frames)
            zoom = page.evaluate(ZOOM, args.frames)
            if args.screenshot:
                page.query_selector("#map-view").screenshot(path=str(args.screenshot))
            browser.close()
    finally:
        server.shutdown()
    print(
        json.dumps(
            {
                "points": args.points,
                "drawn": drawn,
                "first_draw_ms": round(first),
                "repaint_ms_median": round(repaint),
                "zoom_frame_ms_median": round(zoom),
            }
        )
    )


if __name__ == "__main__":
    main()
