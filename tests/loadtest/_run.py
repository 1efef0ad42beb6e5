"""The bench's tools run as a shell runs them: `python -m <module> <args>` from the repo root."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence

from ..support import REPO_ROOT


def run_module(
    module: str,
    args: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args`, its output captured as text; never raises on its exit code."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
