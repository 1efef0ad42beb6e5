"""The harness's port picks: never a port the service or its tools take by default, nor one
a browser refuses to open."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import pytest

from fastapi_redis_mini_harness import ports


def test_a_pick_that_lands_on_a_default_or_browser_unsafe_port_is_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The random draws land on every port never to be picked first, then on one that is fine.
    never = sorted(ports.DEFAULT_PORTS | ports.BROWSER_UNSAFE_PORTS)
    draws: Iterator[int] = iter([*never, 4321])

    def choice(share: Sequence[int]) -> int:
        return next(draws)

    monkeypatch.setattr(random, "choice", choice)
    monkeypatch.setattr(ports, "own_share", lambda _: range(2000, 12000))
    monkeypatch.setattr(ports, "_given", set())

    assert ports.free_port() == 4321


def test_a_pick_passes_over_the_ports_it_is_told_to_avoid(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: Iterator[int] = iter([4000, 4001, 4002])
    monkeypatch.setattr(random, "choice", lambda share: next(draws))
    monkeypatch.setattr(ports, "own_share", lambda _: range(2000, 12000))
    monkeypatch.setattr(ports, "_given", set())

    assert ports.free_port(avoid={4000, 4001}) == 4002


def test_the_service_defaults_are_among_the_ports_never_picked() -> None:
    from fastapi_redis_mini.core.settings import Settings

    fields = Settings.model_fields
    defaults = {fields[name].default for name in ("port", "metrics_port", "api_metrics_port")}
    assert defaults <= ports.DEFAULT_PORTS


@pytest.mark.slow
def test_the_ports_chromium_refuses_in_the_range_are_exactly_those_never_picked() -> None:
    # Every port of the range fetched from a page of the suite's chromium: a refused one fails
    # with ERR_UNSAFE_PORT before any connection is tried, any other with a connection error
    # (nothing listens on most of them, and nothing on them needs to).
    from playwright.sync_api import Request, sync_playwright

    from ..support.browser import CHROMIUM_FLAGS, require_chromium

    refused: set[int] = set()
    failed: list[str] = []

    def on_failed(request: Request) -> None:
        failed.append(request.url)
        if request.failure == "net::ERR_UNSAFE_PORT":
            refused.add(int(request.url.rsplit(":", 1)[1].rstrip("/")))

    with sync_playwright() as playwright:
        chromium = require_chromium()
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.on("requestfailed", on_failed)
            step = 500
            for low in range(ports.LISTEN_RANGE.start, ports.LISTEN_RANGE.stop, step):
                page.evaluate(
                    """async ([low, high]) => {
                        const fetches = [];
                        for (let port = low; port < high; port++) {
                            const url = `http://127.0.0.1:${port}/`;
                            fetches.push(fetch(url, {mode: "no-cors"}).catch(() => null));
                        }
                        await Promise.all(fetches);
                    }""",
                    [low, min(low + step, ports.LISTEN_RANGE.stop)],
                )
        finally:
            browser.close()

    # Most fetches failed, so the page saw them: a refusal among them cannot go unnoticed.
    assert len(failed) > len(ports.LISTEN_RANGE) // 2
    assert refused == ports.BROWSER_UNSAFE_PORTS
