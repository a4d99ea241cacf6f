"""The analyst search page in a real headless Chromium against a real server.

Needs the Debian ``chromium`` package at /usr/bin/chromium and the ``playwright`` Python package
(never ``playwright install``: the system browser is used). Skipped when either is missing.
"""

from __future__ import annotations

import io

import httpx
import pytest
from browser import chromium
from PIL import Image

pytestmark = pytest.mark.served(rows=120)


@pytest.fixture(scope="module")
def server(served):
    return served.server, served.svc


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server[0].url + "/")
    yield page
    context.close()


def test_text_search_renders_results_with_thumbnails(page, server):
    handle, svc = server
    page.fill("#api-key", svc.user_key)
    page.fill(".input-row .input-text", "a red dog")
    page.fill("#k", "8")
    page.click("#search")
    page.wait_for_selector("#results .result >> nth=7")
    # Every card says when its thumbnail has settled; before that an <img> may have no src yet,
    # and decode() on it rejects. decode() then resolves once each image's bytes have decoded
    # (a polled string predicate, wait_for_function, would need the eval the page's CSP forbids).
    page.wait_for_selector("#results .result[data-thumb] >> nth=7")
    widths = page.eval_on_selector_all(
        "#results .result img",
        "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth)))",
    )
    assert widths and all(w > 0 for w in widths)
    cards = page.query_selector_all("#results .result")
    assert len(cards) == 8
    # The page shows what the API answers for the same query, in the same order.
    api = httpx.post(
        f"{handle.url}/v1/search",
        json={"inputs": [{"modality": "text", "text": "a red dog", "weight": 1}], "k": 8},
        headers={"X-API-Key": svc.user_key},
    ).json()["results"]
    assert [c.get_attribute("data-id") for c in cards] == [str(h["id"]) for h in api]
    assert [c.query_selector(".caption").inner_text() for c in cards] == [h["caption"] for h in api]
    assert cards[0].query_selector(".score").inner_text() == f"{api[0]['score']:.4f}"
    # Thumbnails are fetched with the key and shown (the fixture's JPEGs are 64x64); rows
    # stored without one say so instead of showing a broken image.
    sizes = page.eval_on_selector_all(
        "#results .result img", "imgs => imgs.map(i => [i.naturalWidth, i.src.slice(0, 5)])"
    )
    assert sizes and all(s == [64, "blob:"] for s in sizes)
    missing = sum(1 for h in api if h["key"].endswith("9"))
    assert len(sizes) == len(api) - missing
    assert "8 results" in page.inner_text("#status")
    # The key is remembered for the next visit.
    page.reload()
    assert page.input_value("#api-key") == svc.user_key


def test_weighted_mix_with_an_uploaded_image_and_a_filter(page, server, tmp_path):
    _, svc = server
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (40, 70, 220)).save(buf, format="PNG")
    picture = tmp_path / "query.png"
    picture.write_bytes(buf.getvalue())
    page.fill("#api-key", svc.user_key)
    page.fill(".input-row .input-text", "a blue boat")
    page.click("#add-input")
    rows = page.query_selector_all(".input-row")
    assert len(rows) == 2
    assert rows[1].query_selector(".input-modality").input_value() == "image"
    rows[1].query_selector(".input-file").set_input_files(str(picture))
    rows[1].query_selector(".input-weight").fill("0.5")
    page.fill("#filter", "caption LIKE '%blue%'")
    page.fill("#k", "5")
    page.click("#search")
    page.wait_for_selector("#results .result >> nth=4")
    captions = [c.inner_text() for c in page.query_selector_all("#results .caption")]
    assert len(captions) == 5 and all("blue" in c for c in captions)


def test_errors_from_the_service_are_shown(page, server):
    _, svc = server
    page.fill(".input-row .input-text", "a cat")
    page.click("#search")  # no key yet
    page.wait_for_selector("#status.error")
    assert "401 unauthorized" in page.inner_text("#status")
    page.fill("#api-key", svc.user_key)
    page.fill("#filter", "vector > 0")
    page.click("#search")
    # A locator, not wait_for_function: the page's CSP forbids the eval a string predicate needs.
    page.locator("#status", has_text="bad_filter").wait_for()
    assert "unknown column 'vector'" in page.inner_text("#status")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A server over a published index re-tuned on the text queries it logged."""
    import time

    from builders import build_demo_cache, service_settings

    import indexing
    from cachebind.published.querylog import query_log_path, read_log_file
    from cachebind.serve import start_server
    from cachebind.store import CacheTable

    root = tmp_path_factory.mktemp("tuned")
    cache = build_demo_cache(root, rows=200, dim=64)
    svc = service_settings(root, cache, index_poll_s=0.1, query_log={"flush_interval_s": 0.2})
    svc.settings.index.use_gpu = "no"
    svc.settings.index.min_queries_per_set = 20
    indexing.build(
        CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
    )
    with start_server(svc.settings, port=0) as handle:
        headers = {"X-API-Key": svc.user_key}
        for i in range(25):
            body = {"inputs": [{"modality": "text", "text": f"a query {i}"}], "k": 3}
            assert httpx.post(f"{handle.url}/v1/search", json=body, headers=headers).is_success
        log = query_log_path(svc.settings.index.dir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if log.exists() and len(read_log_file(log)[1].get("text", [])) >= 25:
                break
            time.sleep(0.05)
        manifest = indexing.tune(
            CacheTable.open(cache.store), svc.settings.index, indexing.BuildOptions(progress=False)
        )
        deadline = time.monotonic() + 10
        while handle.app.state.serve.runtime.snapshot.version != manifest["version"]:
            assert time.monotonic() < deadline, "the server did not pick up the tuned version"
            time.sleep(0.05)
        yield handle, svc, manifest


def test_the_page_shows_recall_and_latency_per_query_set_and_the_querys_recall(browser, tuned):
    handle, svc, manifest = tuned
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(handle.url + "/")
        page.fill("#api-key", svc.user_key)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#query-sets tr >> nth=1")
        assert page.is_visible("#index-recall")
        rows = page.query_selector_all("#query-sets tr")
        expected = {s["name"]: s for s in manifest["query_sets"]}
        assert {r.get_attribute("data-set") for r in rows} == {"image:held_out", "text:query_log"}
        for row in rows:
            want = expected[row.get_attribute("data-set")]
            cells = [c.inner_text() for c in row.query_selector_all("td")]
            assert cells[0] == want["name"] and cells[1] == str(want["n"])
            assert cells[2:5] == [f"{want['recall'][k]:.3f}" for k in ("1", "10", "100")]
            assert cells[5] == f"{want['latency_ms']['batch1_p50']:.2f}"
        assert "text 25/25" in page.inner_text("#query-log")
        # A text search says which set's recall applies to it.
        page.fill(".input-row .input-text", "a red dog")
        page.click("#search")
        page.locator("#status", has_text="recall").wait_for()
        r10 = expected["text:query_log"]["recall"]["10"]
        assert f"recall@10 {r10:.3f} (text:query_log)" in page.inner_text("#status")
    finally:
        context.close()


def test_the_page_runs_under_its_content_security_policy(browser, server):
    handle, svc = server
    context = browser.new_context()
    page = context.new_page()
    violations: list[str] = []
    page.on(
        "console", lambda m: violations.append(m.text) if "Content Security" in m.text else None
    )
    response = page.goto(handle.url + "/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.evaluate(
        "document.addEventListener('securitypolicyviolation', e => "
        "console.log('Content Security violation ' + e.violatedDirective))"
    )
    page.fill("#api-key", svc.user_key)
    page.fill(".input-row .input-text", "a red dog")
    page.click("#search")
    # The card is there before its thumbnail's fetch ends; data-thumb says the blob URL is set,
    # and decode() then waits for the image's bytes to decode.
    shown = '#results .result[data-thumb="shown"] img'
    page.wait_for_selector(shown)
    width = page.eval_on_selector(shown, "i => i.decode().then(() => i.naturalWidth)")
    assert width == 64
    assert violations == []
    context.close()
