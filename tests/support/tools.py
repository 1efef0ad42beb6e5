"""System tools some tests need (wrk, chromium, prometheus): skipped locally, required in CI."""

from __future__ import annotations

import os
import shutil

import pytest

# promtool's unit tests allocate fast and keep little alive: at Go's default GOGC (100) about
# a quarter of their CPU went to the collector. 400 trades it for about 120 MB at the peak.
PROMTOOL_ENV = {"GOGC": "400"}


def require_tool(name: str, package: str, *, path: str | None = None) -> str:
    """The path of `name` (or `path`, when it is executable); fail under CI=true, else skip.

    .ci/run installs every one of these, so under CI a missing tool is a broken setup, never a
    reason to let the tests that need it pass unseen.
    """
    found = path if path is not None and os.access(path, os.X_OK) else shutil.which(name)
    if found is not None:
        return found
    message = f"{name} is not installed (apt-get install -y {package})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)
    pytest.skip(message)
