"""`make run` (tools/run_local.py) as a user starts it: with only PORT and METRICS_PORT set,
its embedded Valkey stays off the well-known 6379, which another server may hold."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fastapi_redis_mini_harness.ports import free_port

from .support import REPO_ROOT

pytestmark = pytest.mark.slow


def test_make_run_with_only_port_set_puts_valkey_on_a_port_of_its_own() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "VALKEY_PORT"}}
    env |= {"PORT": str(free_port()), "METRICS_PORT": str(free_port())}
    with subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tools" / "run_local.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as running:
        assert running.stdout is not None
        try:
            lines: list[str] = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and len(lines) < 2000:
                line = running.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if "Ctrl-C stops everything" in line:
                    break
            printed = "".join(lines)
            found = re.search(r"embedded valkey on redis://127\.0\.0\.1:(\d+)/", printed)
            assert found, printed
            assert int(found.group(1)) != 6379
            assert "Ctrl-C stops everything" in printed, printed
        finally:
            running.send_signal(signal.SIGINT)
            running.communicate(timeout=60)
    assert running.returncode == 0
