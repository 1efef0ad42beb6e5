"""/docs and /redoc work without the internet: the api serves every asset they load."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, Request, Response, Route, sync_playwright

from fastapi_redis_mini.api import metrics
from fastapi_redis_mini_harness.processes import Process, start_api

from ..support import REPO_ROOT
from ..support.browser import CHROMIUM_FLAGS, require_chromium
from .conftest import ClientFactory

SCREENSHOTS = REPO_ROOT / "reports" / "api"
# (method, path, summary) of the three task operations both pages must show.
TASK_OPERATIONS = {
    ("POST", "/tasks", "Submit Task"),
    ("GET", "/tasks/{task_id}", "Get Task"),
    ("DELETE", "/tasks/{task_id}", "Cancel Task"),
}
ASSETS = (
    "/docs/swagger-ui-bundle.js",
    "/docs/swagger-ui.css",
    "/docs/fastapi/favicon.png",
    "/redoc/redoc.standalone.js",
    "/redoc/logo-mini.svg",
)
RENDER_TIMEOUT_MS = 30_000


def referenced_urls(html: str) -> list[str]:
    """Every src= and href= in a page, as written."""
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html)


def is_external(url: str) -> bool:
    return url.startswith(("http://", "https://", "//"))


def request_counts() -> dict[tuple[str, ...], float]:
    """The api's request counter by label set, as Prometheus would scrape it."""
    return {
        tuple(sample.labels.values()): sample.value
        for family in metrics.http_requests.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_page_loads_only_assets_the_api_serves(
    make_client: ClientFactory, page: str
) -> None:
    async with make_client(worker=False) as client:
        html = (await client.get(page)).text
        urls = referenced_urls(html)
        assert urls, html
        assert [url for url in urls if is_external(url)] == []
        for url in urls:
            assert (await client.get(url)).status_code == 200, url
        assert "fonts.googleapis.com" not in html


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_page_with_a_trailing_slash_leads_to_the_page(
    make_client: ClientFactory, page: str
) -> None:
    async with make_client(worker=False) as client:
        response = await client.get(f"{page}/")
        assert response.status_code == 308
        target = response.url.join(response.headers["location"])
        assert target.path == page
        assert "<html" in (await client.get(target)).text.lower()


async def test_docs_enabled_false_removes_the_pages_and_their_assets(
    make_client: ClientFactory,
) -> None:
    async with make_client(worker=False, docs_enabled=False) as client:
        for path in ("/docs", "/redoc", "/docs/", "/redoc/", *ASSETS):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/openapi.json")).status_code == 200


async def test_static_assets_are_not_counted_in_the_request_metrics(
    make_client: ClientFactory,
) -> None:
    async with make_client(worker=False) as client:
        before = request_counts()
        for path in (*ASSETS, "/docs/missing.js", "/redoc/missing.js"):
            await client.get(path)
        assert request_counts() == before
        await client.get("/docs")
        assert (
            request_counts().get(("GET", "/docs", "200"), 0)
            == before.get(("GET", "/docs", "200"), 0) + 1
        )


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium()


@pytest.fixture
def api(redis_url: str) -> Iterator[Process]:
    service = start_api(redis_url)
    try:
        yield service
    finally:
        service.close()


class OfflineBrowser:
    """A page that may reach loopback only; it records what it tried beyond that and what failed."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.outside: list[str] = []
        self.failed: list[str] = []
        page.context.route("**/*", self._guard)
        page.on("requestfailed", lambda request: self.failed.append(request.url))
        page.on("response", self._check)

    def _guard(self, route: Route, request: Request) -> None:
        host = urlsplit(request.url).hostname or ""
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            route.continue_()
        else:
            self.outside.append(request.url)
            route.abort("internetdisconnected")

    def _check(self, response: Response) -> None:
        if response.status >= 400:
            self.failed.append(f"{response.status} {response.url}")

    def open(self, url: str) -> str:
        response = self.page.goto(url)
        assert response is not None
        assert response.status == 200
        return response.text()


@pytest.mark.slow
def test_docs_and_redoc_render_the_task_operations_offline(chromium: str, api: Process) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            offline = OfflineBrowser(browser.new_page(viewport={"width": 1400, "height": 1000}))
            page = offline.page

            swagger_html = offline.open(f"{api.base_url}/docs")
            page.locator(".opblock").first.wait_for(timeout=RENDER_TIMEOUT_MS)
            swagger = {
                (
                    block.locator(".opblock-summary-method").inner_text().strip(),
                    block.locator(".opblock-summary-path").get_attribute("data-path") or "",
                    block.locator(".opblock-summary-description").inner_text().strip(),
                )
                for block in page.locator(".opblock").all()
            }
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "docs-swagger-ui.png"), full_page=True)

            redoc_html = offline.open(f"{api.base_url}/redoc")
            operations = page.locator("[data-section-id*='/operation/']")
            operations.first.wait_for(timeout=RENDER_TIMEOUT_MS)
            redoc = set()
            for section in operations.all():
                endpoint = section.locator("button:has(.http-verb)").first
                method, path = endpoint.locator("span").all_inner_texts()[:2]
                summary = section.locator("h2").first.inner_text().strip()
                redoc.add((method.strip().upper(), path.strip(), summary))
            page.screenshot(path=str(SCREENSHOTS / "redoc.png"))
        finally:
            browser.close()

    assert offline.outside == []
    assert offline.failed == []
    for html in (swagger_html, redoc_html):
        assert [url for url in referenced_urls(html) if is_external(url)] == []
    assert swagger >= TASK_OPERATIONS
    assert redoc >= TASK_OPERATIONS
