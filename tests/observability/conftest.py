"""Fixtures for the observability tests: Debian's prometheus, promtool and amtool binaries."""

from __future__ import annotations

import pytest

from ..support.tools import require_tool


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return require_tool("prometheus", "prometheus")


@pytest.fixture(scope="session")
def redis_exporter_binary() -> str:
    return require_tool("prometheus-redis-exporter", "prometheus-redis-exporter")


@pytest.fixture(scope="session")
def amtool() -> str:
    return require_tool("amtool", "prometheus-alertmanager")
