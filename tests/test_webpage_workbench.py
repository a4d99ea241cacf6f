"""The workbench views of the web page in a real headless Chromium against a real server:
point-cloud upload, keyboard-only search into a result's detail and "more like this", CSV
export read back, the enhance view, the map (a click opens an item) and phone width.

Screenshots go to the test's tmp_path (``workbench-*.png``) to be looked at.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from browser import chromium

from cachebind.analysis.map_run import compute_map
from cachebind.analysis.zero_shot import classify_table

pytestmark = pytest.mark.served(rows=120, llm=True)
LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto(served.url + "/")
    page.fill("#api-key", served.svc.user_key)
    yield page
    context.close()


def search_text(page, text: str, k: int = 6) -> None:
    page.fill(".input-row .input-text", text)
    page.fill("#k", str(k))
    page.click("#search")
    page.wait_for_selector(f"#results .result[data-thumb] >> nth={k - 1}")


@dataclass(frozen=True)
class MapView:
    """The map as the page drew it: the service's positions and the page's transform (uniform
    scale, 12 px padding, y up) from layout to canvas pixels, and from canvas to page pixels."""

    data: dict[str, Any]
    width: float
    height: float
    box: dict[str, float]

    @classmethod
    def read(cls, page: Any, served: Any, **params: str) -> MapView:
        data = httpx.get(
            f"{served.url}/v1/map",
            params=params,
            headers={"Authorization": f"Bearer {served.svc.user_key}"},
        ).json()
        width, height = page.evaluate("[$('#map-canvas').width, $('#map-canvas').height]")
        return cls(data, width, height, page.query_selector("#map-canvas").bounding_box())

    @property
    def x(self) -> np.ndarray:
        return np.array(self.data["x"])

    @property
    def y(self) -> np.ndarray:
        return np.array(self.data["y"])

    @property
    def scale(self) -> float:
        x, y = self.x, self.y
        return float(min((self.width - 24) / np.ptp(x), (self.height - 24) / np.ptp(y)))

    def to_canvas(self, x: Any, y: Any) -> np.ndarray:
        """Layout positions -> canvas pixels [..., 2]."""
        px = 12 + (np.asarray(x) - self.x.min()) * self.scale
        py = self.height - 12 - (np.asarray(y) - self.y.min()) * self.scale
        return np.stack([px, py], -1)

    def drawn(self) -> np.ndarray:
        """Every dot's canvas position [n, 2] at zoom 1."""
        return self.to_canvas(self.x, self.y)

    def to_page(self, p: Any) -> tuple[float, float]:
        """A canvas pixel -> the page coordinates a mouse event needs."""
        box = self.box
        return (
            box["x"] + float(p[0]) * box["width"] / self.width,
            box["y"] + float(p[1]) * box["height"] / self.height,
        )


def show_pca_map(page: Any, served: Any, drawn: str) -> MapView:
    """Compute a PCA map of the served table, show it on the page (whole canvas in view) and
    wait until ``drawn`` (a selector on the canvas's state) holds."""
    settings = served.svc.settings.model_copy(deep=True)
    settings.analysis.map_method = "pca"
    compute_map(settings)
    page.set_viewport_size({"width": 1280, "height": 1400})
    page.click("#show-map")
    page.wait_for_selector(drawn)
    return MapView.read(page, served)


def test_keyboard_only_search_reaches_a_result_and_opens_its_detail(page, tmp_path):
    page.focus(".input-row .input-text")
    page.keyboard.type("a green boat")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results .result >> nth=0")
    for _ in range(60):  # Tab until a result card has the focus
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('result')"):
            break
    else:
        pytest.fail("no result card is reachable with Tab")
    focused = page.evaluate("document.activeElement.dataset.id")
    page.keyboard.press("Enter")
    page.wait_for_selector("#detail[open][data-thumb]")
    assert page.get_attribute("#detail", "data-id") == focused
    page.screenshot(path=str(tmp_path / "workbench-detail.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail:not([open])", state="attached")


def test_more_like_this_searches_with_the_items_picture(page, served):
    search_text(page, "a red dog")
    page.click("#results .result >> nth=0")
    page.wait_for_selector("#detail[data-thumb='shown']")
    page.click("#more-like-this")
    page.wait_for_selector("#status >> text=/results like row/")
    assert len(page.query_selector_all("#results .result")) == 6


def test_results_export_to_a_csv_that_reads_back_as_the_cards(page, tmp_path):
    search_text(page, "a blue tree", k=5)
    with page.expect_download() as info:
        page.click("#export-csv")
    path = tmp_path / "results.csv"
    info.value.save_as(path)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    cards = page.query_selector_all("#results .result")
    assert [r["id"] for r in rows] == [c.get_attribute("data-id") for c in cards]
    assert [r["caption"] for r in rows] == [
        c.query_selector(".caption").inner_text() for c in cards
    ]


def test_results_export_to_parquet_with_the_cards_rows_in_order(page, tmp_path):
    import pyarrow.parquet as pq

    search_text(page, "a green flower", k=5)
    with page.expect_download() as info:
        page.click("#export-parquet")
    path = tmp_path / "results.parquet"
    info.value.save_as(path)
    rows = pq.read_table(path).to_pylist()
    cards = page.query_selector_all("#results .result")
    assert [str(r["id"]) for r in rows] == [c.get_attribute("data-id") for c in cards]
    captions = [c.query_selector(".caption").inner_text() for c in cards]
    assert [r["caption"] for r in rows] == captions


def test_a_point_cloud_upload_searches(page, tmp_path):
    cloud = np.random.default_rng(0).standard_normal((2048, 3))
    path = tmp_path / "cloud.xyz"
    path.write_text("\n".join(" ".join(f"{v:.5f}" for v in p) for p in cloud) + "\n")
    page.select_option(".input-row .input-modality", "point")
    page.query_selector(".input-row .input-file").set_input_files(str(path))
    page.fill("#k", "4")
    page.click("#search")
    page.wait_for_selector("#results .result >> nth=3")
    assert "error" not in (page.get_attribute("#status", "class") or "")


def test_the_enhance_view_shows_the_neighbours_weights_and_the_enhanced_results(page, tmp_path):
    page.fill(".input-row .input-text", "a purple cat")
    page.click("#enhance")
    page.wait_for_selector("#enhance-view:not([hidden]) #enhance-results li")
    weights = [
        float(row.query_selector_all("td")[3].inner_text())
        for row in page.query_selector_all("#enhance-neighbours tr")
    ]
    assert len(weights) >= 1 and sum(weights) == pytest.approx(1.0, abs=1e-3 * len(weights))
    assert "cosine(F, F~)" in page.inner_text("#enhance-summary")
    page.screenshot(path=str(tmp_path / "workbench-enhance.png"), full_page=True)


def test_the_map_renders_coloured_by_label_and_a_click_opens_an_item(page, served, tmp_path):
    settings = served.svc.settings.model_copy(deep=True)
    settings.analysis.map_method = "pca"
    compute_map(settings)
    labels = classify_table(
        settings, LABELS, templates=["a {} picture"], encoder=served.runtime.encoder
    )
    page.set_viewport_size({"width": 1280, "height": 1400})  # the whole canvas in view
    page.fill("#label-table", labels.name)
    page.click("#show-map")
    page.wait_for_selector("#map-canvas[data-points='120']")
    assert len(page.query_selector_all("#map-legend li")) == len(
        {*classify_labels(served, labels.name)}
    )
    page.screenshot(path=str(tmp_path / "workbench-map.png"), full_page=True)
    # Click the first point where the page drew it (its transform: uniform scale, 12 px pad).
    view = MapView.read(page, served, labels=labels.name)
    data, x, y, scale = view.data, view.x, view.y, view.scale
    page.mouse.click(*view.to_page(view.to_canvas(x[0], y[0])))
    page.wait_for_selector("#detail[open][data-thumb]")
    opened = page.get_attribute("#detail", "data-id")
    page.click("#detail-close")
    # The nearest drawn dot to the click: the first point, or one drawn on top of it.
    ox, oy = x[data["ids"].index(opened)], y[data["ids"].index(opened)]
    assert np.hypot((ox - x[0]) * scale, (oy - y[0]) * scale) <= 8

    # Shift + drag over the whole canvas selects every dot; the selection exports as Parquet.
    import pyarrow.parquet as pq

    page.keyboard.down("Shift")
    box = view.box
    page.mouse.move(box["x"] + 1, box["y"] + 1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 1, box["y"] + box["height"] - 1, steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")
    page.wait_for_selector("#map-canvas[data-selected='120']")
    with page.expect_download() as info:
        page.click("#map-export")
    info.value.save_as(tmp_path / "selection.parquet")
    exported = pq.read_table(tmp_path / "selection.parquet")["id"].to_pylist()
    assert sorted(str(i) for i in exported) == sorted(data["ids"])

    # The same label table filters a search to the rows of the labels asked.
    blue = {i for i, label in zip(data["ids"], data["labels"], strict=True) if label == "blue"}
    page.fill("#label-filter", "blue")
    search_text(page, "a red dog", k=min(6, len(blue)))
    assert {c.get_attribute("data-id") for c in page.query_selector_all(".result")} <= blue


def legend(page) -> dict[str, int]:
    """The map's legend as {category: count}, read from its "name (n)" items."""
    items = [li.inner_text().rsplit(" (", 1) for li in page.query_selector_all("#map-legend li")]
    return {name: int(n.rstrip(")")) for name, n in items}


def test_the_map_is_coloured_by_shard_or_a_caption_word_as_the_analyst_chooses(
    page, served, tmp_path
):
    settings = served.svc.settings.model_copy(deep=True)
    settings.analysis.map_method = "pca"
    compute_map(settings)
    rows = served.runtime.snapshot.table.dataset.to_table(columns=["caption", "shard"])
    shards = rows["shard"].to_pylist()
    page.set_viewport_size({"width": 1280, "height": 1400})
    page.click("#show-map")
    page.wait_for_selector("#map-canvas[data-points='120']")

    page.select_option("#map-colour", "shard")
    page.click("#map-recolour")
    page.wait_for_selector("#map-canvas[data-colour='shard']")
    assert legend(page) == {s: shards.count(s) for s in set(shards)}
    page.screenshot(path=str(tmp_path / "workbench-map-shard.png"), full_page=True)

    word = rows["caption"][0].as_py().split()[-1]
    holding = sum(word in c.split() for c in rows["caption"].to_pylist())
    page.select_option("#map-colour", "word")
    page.fill("#map-word", word)
    page.click("#map-recolour")
    page.wait_for_selector(f"#map-canvas[data-colour='word:{word}']")
    assert legend(page) == {word: holding, f"no {word}": 120 - holding}
    assert f"coloured by word:{word}" in page.inner_text("#map-summary")

    # Two words are refused with the server's reason; the map drawn stays.
    page.fill("#map-word", "two words")
    page.click("#map-recolour")
    page.wait_for_selector("#status.error")
    assert "one word" in page.inner_text("#status")
    assert page.get_attribute("#map-canvas", "data-colour") == f"word:{word}"


def test_the_current_results_and_the_query_are_placed_on_the_map(page, served, tmp_path):
    settings = served.svc.settings.model_copy(deep=True)
    settings.analysis.map_method = "pca"
    compute_map(settings)
    page.set_viewport_size({"width": 1280, "height": 1400})
    search_text(page, "a red dog", k=8)
    page.click("#show-map")
    page.wait_for_selector("#map-canvas[data-points='120'][data-results='8']")
    view = MapView.read(page, served)

    def query_position() -> tuple[float, float]:
        """Where the service places the page's query, drawn by the page's transform."""
        inputs = page.evaluate("state.body.inputs")
        placed = httpx.post(
            f"{served.url}/v1/map/place",
            json={"inputs": inputs},
            headers={"Authorization": f"Bearer {served.svc.user_key}"},
        ).json()
        px, py = view.to_canvas(placed["x"], placed["y"])
        return float(px), float(py)

    def drawn_query() -> list[float]:
        return [float(v) for v in page.get_attribute("#map-canvas", "data-query").split(",")]

    page.wait_for_selector("#map-canvas[data-query]")
    assert drawn_query() == pytest.approx(query_position(), abs=0.01)
    page.screenshot(path=str(tmp_path / "workbench-map-query.png"), full_page=True)

    # A new search moves the rings and the query with it, on the map already drawn.
    before = page.get_attribute("#map-canvas", "data-query-layout")
    search_text(page, "a blue cat", k=3)
    page.wait_for_selector("#map-canvas[data-results='3']")
    page.wait_for_selector(f"#map-canvas[data-query-layout]:not([data-query-layout='{before}'])")
    assert drawn_query() == pytest.approx(query_position(), abs=0.01)


def test_a_lasso_selects_the_dots_inside_a_freeform_polygon_and_exports_them(
    page, served, tmp_path
):
    import pyarrow.parquet as pq
    from matplotlib.path import Path

    view = show_pca_map(page, served, "#map-canvas[data-points='120']")
    data, width, height, drawn = view.data, view.width, view.height, view.drawn()

    def clearance(corners: list[tuple[float, float]]) -> float:
        """The least distance in canvas pixels from a dot to the polygon's edges."""
        ends = np.array([*corners, corners[0]])
        a, b = ends[:-1], ends[1:]
        t = ((drawn[:, None] - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1)
        nearest = a + np.clip(t, 0, 1)[..., None] * (b - a)
        return float(np.linalg.norm(drawn[:, None] - nearest, axis=-1).min())

    # A triangle no box equals: the canvas's left side and a tip on its right edge, placed
    # where no dot lies within 3 px of an edge (a pixel's rounding must not decide a dot).
    corners = next(
        c
        for tip in np.linspace(0.3, 0.7, 41)
        if clearance(c := [(2.0, 2.0), (width - 2.0, tip * height), (2.0, height - 2.0)]) > 3
    )
    inside = Path(corners).contains_points(drawn)
    assert 0 < inside.sum() < len(inside)
    page.select_option("#map-tool", "lasso")
    page.keyboard.down("Shift")
    to_page = [view.to_page(corner) for corner in corners]
    page.mouse.move(*to_page[0])
    page.mouse.down()
    for corner in [*to_page[1:], to_page[0]]:
        page.mouse.move(*corner, steps=8)
    page.mouse.up()
    page.keyboard.up("Shift")
    page.wait_for_selector(f"#map-canvas[data-selected='{int(inside.sum())}']")
    page.screenshot(path=str(tmp_path / "workbench-map-lasso.png"), full_page=True)
    with page.expect_download() as info:
        page.click("#map-export")
    info.value.save_as(tmp_path / "lasso.parquet")
    exported = {str(i) for i in pq.read_table(tmp_path / "lasso.parquet")["id"].to_pylist()}
    assert exported == {i for i, keep in zip(data["ids"], inside, strict=True) if keep}


def test_arrow_keys_move_a_ring_between_the_maps_points_and_enter_opens_one(page, served):
    settings = served.svc.settings.model_copy(deep=True)
    settings.analysis.map_method = "pca"
    compute_map(settings)
    page.set_viewport_size({"width": 1280, "height": 1400})
    page.click("#show-map")
    page.wait_for_selector("#map-canvas[data-points='120']")
    data = httpx.get(
        f"{served.url}/v1/map", headers={"Authorization": f"Bearer {served.svc.user_key}"}
    ).json()
    position = {i: (x, y) for i, x, y in zip(data["ids"], data["x"], data["y"], strict=True)}
    page.focus("#map-canvas")
    page.keyboard.press("ArrowRight")  # the first press lands on a point
    visited = [page.get_attribute("#map-canvas", "data-focus")]
    # The layout's y points up, the canvas's down: ArrowUp moves to a larger layout y.
    for key, axis, sign in [("ArrowRight", 0, 1), ("ArrowUp", 1, 1), ("ArrowLeft", 0, -1)]:
        page.keyboard.press(key)
        now = page.get_attribute("#map-canvas", "data-focus")
        before = visited[-1]
        assert now != before, key
        assert sign * (position[now][axis] - position[before][axis]) > 0, key
        visited.append(now)
    page.keyboard.press("Enter")
    page.wait_for_selector(f"#detail[open][data-id='{visited[-1]}']")


def test_a_map_of_more_than_fifty_thousand_points_is_painted_as_a_density_image_of_their_colours(
    page,
):
    # Two labelled halves of a 60,000-point layout, drawn by the page's own drawMap: each dot's
    # 2 x 2 cell carries its label's colour, and the legend counts every point.
    drawn = page.evaluate(
        """() => {
          const n = 60000, x = [], y = [], ids = [], labels = [];
          for (let i = 0; i < n; i++) {
            x.push((i % 300) / 300 + (i < n / 2 ? 0 : 2));
            y.push(Math.floor(i / 300) / 200);
            ids.push(String(i));
            labels.push(i < n / 2 ? "left" : "right");
          }
          $("#map-view").hidden = false;
          drawMap({ x, y, ids, labels, count: n });
          const ctx = $("#map-canvas").getContext("2d");
          const probe = (i) => [...ctx.getImageData(
            Math.round(mapState.px[i]) - 1, Math.round(mapState.py[i]) - 1, 1, 1).data];
          return { left: probe(150), right: probe(n - 150), colours: mapState.colours,
                   points: $("#map-canvas").dataset.points };
        }"""
    )
    assert drawn["points"] == "60000"
    assert legend(page) == {"left": 30000, "right": 30000}
    for side, i in [("left", 150), ("right", 60000 - 150)]:
        colour = drawn["colours"][i]
        rgb = [int(colour[k : k + 2], 16) for k in (1, 3, 5)]
        # At least one dot's opacity (90 + 40 per dot, of 255) where the probed dot lies; the
        # canvas stores premultiplied alpha, so a channel reads back within a rounding of 2.
        assert np.abs(np.array(drawn[side][:3]) - rgb).max() <= 2, side
        assert drawn[side][3] >= 130, side


def test_the_generate_view_streams_text_with_the_neighbours_used(page, served, tmp_path):
    page.fill(".input-row .input-text", "a red dog")
    page.click("#show-generate")
    page.fill("#generate-prompt", "Describe it.")
    page.click("#generate")
    page.wait_for_selector("#generate-text[data-done]")
    neighbours = page.query_selector_all("#generate-neighbours li")
    assert len(neighbours) == served.svc.settings.cache.k
    assert page.inner_text("#status") == "generated"
    page.screenshot(path=str(tmp_path / "workbench-generate.png"), full_page=True)


def test_the_gap_view_shows_the_last_report_with_its_plots(page, served, tmp_path):
    from cachebind.analysis.gap import QueryGroup
    from cachebind.analysis.gap_report import REPORT_DIR
    from cachebind.analysis.notebook import gap_report

    settings = served.svc.settings
    queries = np.random.default_rng(2).standard_normal((40, served.cache.dim))
    group = QueryGroup("text:file:q.npy", "text", queries.astype(np.float32))
    report = gap_report(settings, [group], out_dir=settings.index.dir / REPORT_DIR)
    page.click("#show-gap")
    page.wait_for_selector("#gap-view:not([hidden]) #gap-figures img >> nth=1")
    cells = [c.inner_text() for c in page.query_selector_all("#gap-rows tr >> nth=0 >> td")]
    distance = report.results[0].before.centroid_distance
    assert cells[:3] == ["text:file:q.npy", "query", "40"] and cells[3] == f"{distance:.4f}"
    widths = page.eval_on_selector_all(
        "#gap-figures img",
        "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth)))",
    )
    assert len(widths) == 2 and all(w > 0 for w in widths)
    page.screenshot(path=str(tmp_path / "workbench-gap.png"), full_page=True)


def classify_labels(served, name: str) -> list[str]:
    from cachebind.analysis.labelling import open_side_table

    store = served.svc.settings.store
    return open_side_table(store, name).to_lance().to_table()["label"].to_pylist()


def test_at_phone_width_nothing_is_wider_than_the_screen(browser, served, tmp_path):
    context = browser.new_context(viewport={"width": 375, "height": 740})
    page = context.new_page()
    page.goto(served.url + "/")
    page.fill("#api-key", served.svc.user_key)
    search_text(page, "a yellow house", k=4)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    page.screenshot(path=str(tmp_path / "workbench-phone.png"), full_page=True)
    context.close()
    assert overflow <= 0


def test_the_map_zooms_around_the_cursor_pans_by_drag_and_a_click_opens_the_item_zoomed_in(
    page, served, tmp_path
):
    view = show_pca_map(page, served, "#map-canvas[data-points='120'][data-zoom='1.0000']")
    data, width, height, box, base = view.data, view.width, view.height, view.box, view.drawn()
    to_page = view.to_page

    # A dot with a neighbour 10-60 px away at zoom 1: zoomed in around the dot, the neighbour
    # moves away from the cursor by the zoom factor, and a click where it now is opens it.
    gaps = np.linalg.norm(base[:, None] - base[None], axis=-1) + np.eye(len(base)) * 1e9
    anchor, neighbour = next(
        (int(i), int(np.argmin(gaps[i]))) for i in range(len(base)) if 10 < gaps[i].min() < 60
    )
    centre = base[anchor]
    page.mouse.move(*to_page(centre))
    for _ in range(3):  # one wheel step at a time: each is seen before the next is sent
        before = page.get_attribute("#map-canvas", "data-zoom")
        page.mouse.wheel(0, -300)
        page.wait_for_selector(f"#map-canvas:not([data-zoom='{before}'])")
    zoom = float(page.get_attribute("#map-canvas", "data-zoom"))
    assert zoom > 3
    zoomed = centre + (base - centre) * zoom  # the cursor's point stays where it was
    target = zoomed[neighbour]
    assert 0 < target[0] < width and 0 < target[1] < height
    # Nothing else is drawn within a click's reach of it at this zoom.
    assert np.sort(np.linalg.norm(zoomed - target, axis=1))[1] > 8
    page.screenshot(path=str(tmp_path / "workbench-map-zoomed.png"), full_page=True)
    page.mouse.click(*to_page(target))
    page.wait_for_selector(f"#detail[open][data-id='{data['ids'][neighbour]}']")
    page.click("#detail-close")

    # A drag pans by its length and opens nothing; the dot moves with it and still opens.
    start = np.array([width / 2, height / 2])
    shift = np.array([-120.0, 80.0])
    page.mouse.move(*to_page(start))
    page.mouse.down()
    page.mouse.move(*to_page(start + shift), steps=6)
    page.mouse.up()
    assert page.get_attribute("#detail", "open") is None
    offset = [float(v) for v in page.get_attribute("#map-canvas", "data-offset").split(",")]
    # Pointer events carry whole CSS pixels: the cursor was up to one (width / box width
    # canvas pixels) off each point asked, and the zoom scales the anchor's part of that.
    ratio = width / box["width"]
    np.testing.assert_allclose(offset, centre * (1 - zoom) + shift, atol=(zoom + 1) * ratio)
    target = target + shift
    page.mouse.click(*to_page(target))
    page.wait_for_selector(f"#detail[open][data-id='{data['ids'][neighbour]}']")
    page.click("#detail-close")

    # A box selection in the zoomed view takes the dots drawn inside it.
    corner_a, corner_b = target - 30, target + 30
    drawn = zoomed + shift
    inside = ((drawn >= corner_a) & (drawn <= corner_b)).all(1)
    page.keyboard.down("Shift")
    page.mouse.move(*to_page(corner_a))
    page.mouse.down()
    page.mouse.move(*to_page(corner_b), steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")
    page.wait_for_selector(f"#map-canvas[data-selected='{int(inside.sum())}']")

    # The reset button, from the keyboard, shows the whole map again.
    page.focus("#map-reset")
    page.keyboard.press("Enter")
    page.wait_for_selector("#map-canvas[data-zoom='1.0000'][data-offset='0.00,0.00']")
    page.focus("#map-canvas")
    page.keyboard.press("+")
    page.wait_for_selector("#map-canvas[data-zoom='1.5000']")
    page.keyboard.press("0")
    page.wait_for_selector("#map-canvas[data-zoom='1.0000']")
