"""``/docs`` and ``/redoc`` work with no network beyond the server: their scripts are its own
files, and Swagger UI renders the API's operations in a headless Chromium that may reach
nothing else."""

from __future__ import annotations

import re

import httpx
import pytest
from browser import chromium

pytestmark = pytest.mark.served(rows=20)


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_pages_load_every_script_and_style_from_this_server(served, path):
    page = httpx.get(served.url + path)
    assert page.status_code == 200
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    refs += re.findall(r"""url: ?['"]([^'"]+)['"]""", page.text)
    assert refs and all(r.startswith("/") for r in refs), refs
    for ref in refs:
        assert httpx.get(served.url + ref).status_code == 200, ref
    assert "cdn" not in page.headers["content-security-policy"]


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def test_swagger_ui_renders_the_operations_offline(served, browser):
    outside: list[str] = []
    page = browser.new_page()

    def only_the_server(route) -> None:
        if route.request.url.startswith(served.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    page.goto(served.url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=60_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    page.close()
    assert "/v1/search" in paths and "/v1/chat/completions" in paths
    assert outside == []
