"""A page from another origin uses the API in a real headless Chromium: CORS for allow-listed
origins only, thumbnails by signed URLs in plain ``<img src>``, 64-bit ids exact in JavaScript.
Also the HTTP rules under it: preflights, signatures, expiry."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from browser import chromium

from cachebind.serve.signing import signature

SECRET = "a signing secret known to this test"
pytestmark = pytest.mark.served(rows=80, cursor_secret=SECRET)

# The other origin's page: searches with the key from its URL fragment and shows each result's
# thumbnail by its signed URL, and its id as JavaScript holds it (a string, and through BigInt).
PAGE = b"""<!doctype html><html><body><div id="results"></div><script>
const [api, key] = decodeURIComponent(location.hash.slice(1)).split(" ");
fetch(api + "/v1/search", {
  method: "POST",
  headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
  body: JSON.stringify({inputs: [{modality: "text", text: "a red dog"}], k: 6}),
}).then(r => r.json()).then(body => {
  for (const hit of body.results) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.id = hit.id;
    card.dataset.bigint = BigInt(hit.id).toString();
    const img = document.createElement("img");
    img.src = hit.thumbnail_url;
    card.appendChild(img);
    document.getElementById("results").appendChild(card);
  }
  document.body.dataset.done = "yes";
}).catch(e => { document.body.dataset.error = String(e); });
</script></body></html>"""


@pytest.fixture(scope="module")
def origin():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def allowed(served, origin):
    config = served.svc.settings.serve
    old = config.cors_origins
    config.cors_origins = [origin]
    yield origin
    config.cors_origins = old


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def open_page(browser, origin: str, served) -> tuple:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{origin}/#{served.url} {served.svc.user_key}")
    return context, page


def api_ids(served) -> list[str]:
    r = httpx.post(
        f"{served.url}/v1/search",
        json={"inputs": [{"modality": "text", "text": "a red dog"}], "k": 6},
        headers={"Authorization": f"Bearer {served.svc.user_key}"},
        timeout=60,
    )
    return [h["id"] for h in r.json()["results"]]


def test_an_allow_listed_origins_page_shows_results_thumbnails_and_exact_ids(
    browser, served, allowed
):
    context, page = open_page(browser, allowed, served)
    try:
        page.wait_for_selector("body[data-done=yes]", state="attached", timeout=60_000)
        cards = page.query_selector_all(".card")
        page.wait_for_function(
            "[...document.images].every(i => i.complete && i.naturalWidth > 0)", timeout=60_000
        )
        ids = [c.get_attribute("data-id") for c in cards]
        assert ids == api_ids(served) and len(ids) == 6
        assert [c.get_attribute("data-bigint") for c in cards] == ids
        assert any(int(i) > 2**53 for i in ids)  # ids a JavaScript number would round
    finally:
        context.close()


def test_an_origin_not_allow_listed_cannot_read_the_api(browser, served, origin):
    context, page = open_page(browser, origin, served)
    try:
        page.wait_for_selector("body[data-error]", state="attached", timeout=60_000)
        assert page.query_selector_all(".card") == []
    finally:
        context.close()


def test_a_preflight_never_gets_401_and_only_an_allowed_origin_gets_cors_headers(served, origin):
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    preflight["Access-Control-Request-Headers"] = "authorization, content-type"
    off = httpx.options(f"{served.url}/v1/search", headers=preflight)
    assert off.status_code != 401 and "access-control-allow-origin" not in off.headers
    config = served.svc.settings.serve
    old, config.cors_origins = config.cors_origins, [origin]
    try:
        on = httpx.options(f"{served.url}/v1/search", headers=preflight)
        refused = httpx.post(f"{served.url}/v1/search", json={}, headers={"Origin": origin})
    finally:
        config.cors_origins = old
    assert on.status_code == 204
    assert on.headers["access-control-allow-origin"] == origin
    assert "authorization" in on.headers["access-control-allow-headers"]
    # An error is readable by the page too (it can tell a bad key from a network failure).
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin


def test_a_thumbnail_url_needs_no_key_until_it_expires_and_only_for_its_own_id(served):
    r = httpx.post(
        f"{served.url}/v1/search?ids=number",
        json={"inputs": [{"modality": "text", "text": "a dog"}], "k": 2},
        headers={"Authorization": f"Bearer {served.svc.user_key}"},
        timeout=60,
    )
    first, second = r.json()["results"]
    assert isinstance(first["id"], int)  # numbers where the client asks
    assert httpx.get(first["thumbnail_url"]).content[:2] == b"\xff\xd8"
    assert httpx.get(f"{served.url}{first['image_url']}").status_code == 401  # no key, no sig
    other = first["thumbnail_url"].replace(str(first["id"]), str(second["id"]))
    assert httpx.get(other).status_code == 403  # a signature opens its own id only
    secret = SECRET.encode()
    past = int(time.time()) - 1
    expired = f"{served.url}/v1/images/{first['id']}?expires={past}&signature="
    expired += signature(secret, first["id"], past)
    r = httpx.get(expired)
    assert r.status_code == 403 and r.json()["error"] == "expired"
