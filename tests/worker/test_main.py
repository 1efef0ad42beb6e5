"""`python -m fastapi_redis_mini.worker` as operators start it."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from fastapi_redis_mini_harness.processes import service_env

pytestmark = pytest.mark.slow


def test_a_worker_whose_metrics_port_is_taken_exits_with_one_line(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = subprocess.run(
            [sys.executable, "-m", "fastapi_redis_mini.worker"],
            env=service_env(redis_url, METRICS_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert completed.returncode == 1
    last = completed.stderr.strip().splitlines()[-1]
    assert last == f"fastapi-redis-mini: cannot serve /metrics on 127.0.0.1:{port} (METRICS_PORT)"
    assert "Traceback" not in completed.stderr
