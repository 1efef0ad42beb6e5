"""Locust's web UI driven in a real browser (Debian's chromium) against the real service."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from fastapi_redis_mini_harness.ports import free_port

from ..support import REPO_ROOT
from ..support.browser import CHROMIUM_FLAGS, require_chromium
from .conftest import FAST_MIX, RunningService, locust_command, locust_env

pytestmark = pytest.mark.slow

SCREENSHOT = REPO_ROOT / "reports" / "loadtest" / "locust-web-ui.png"
TASK_ROWS = ("POST /tasks", "task end-to-end")
ENOUGH_TASKS = 10
SWARM_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium()


@pytest.fixture
def locust_ui(service: RunningService, tmp_path: Path) -> Iterator[str]:
    """Locust serving its web UI on a free loopback port, aimed at the service."""
    port = free_port()
    log = (tmp_path / "locust.log").open("wb")
    process = subprocess.Popen(
        locust_command(service.url, "--web-host", "127.0.0.1", "--web-port", str(port), *FAST_MIX),
        cwd=tmp_path,
        env=locust_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "locust.log").read_text()
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "the Locust web UI did not come up"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def statistics(page: Page) -> dict[str, dict[str, str]]:
    """The statistics table as {name: {column: cell}}."""
    headers = [cell.strip() for cell in page.locator("table thead th").all_inner_texts()]
    rows: dict[str, dict[str, str]] = {}
    for row in page.locator("table tbody tr").all():
        cells = [cell.strip() for cell in row.locator("td").all_inner_texts()]
        record = dict(zip(headers, cells, strict=False))
        rows[" ".join(record.get("Name", "").split())] = record
    return rows


def test_swarm_started_from_the_web_ui_shows_task_rows_without_failures(
    chromium: str, locust_ui: str
) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(locust_ui)
            page.fill("input[name=userCount]", "8")
            page.fill("input[name=spawnRate]", "8")
            page.get_by_role("button", name="Start").click()

            deadline = time.monotonic() + SWARM_TIMEOUT
            rows = statistics(page)
            while not all(
                name in rows and int(rows[name]["# Requests"]) >= ENOUGH_TASKS for name in TASK_ROWS
            ):
                assert time.monotonic() < deadline, f"task rows never filled in: {rows}"
                page.wait_for_timeout(500)
                rows = statistics(page)

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            page.get_by_role("button", name="Stop").click()
        finally:
            browser.close()

    assert {name: row["# Fails"] for name, row in rows.items()} == {name: "0" for name in rows}
    assert rows["task end-to-end"]["Type"] == "TASK"
