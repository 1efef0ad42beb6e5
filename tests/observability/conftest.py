"""Fixtures for the observability tests: Debian's prometheus and promtool binaries."""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str) -> str:
    """The path of a prometheus-package binary; fail under CI=true when missing, else skip."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} not on PATH: install it with `apt-get install -y prometheus`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true requires it; .ci/run installs it)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return require_binary("prometheus")
