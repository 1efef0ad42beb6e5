"""Debian's chromium, driven by playwright: the one way the suite opens a real browser."""

from __future__ import annotations

from .tools import require_tool

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def require_chromium() -> str:
    """The chromium binary; under CI=true its absence fails the test instead of skipping it."""
    return require_tool("chromium", "chromium", path=CHROMIUM)
