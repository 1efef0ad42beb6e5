"""Fixtures for the load-test tests: the real api and worker, and Locust as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastapi_redis_mini_harness.processes import Process, start_api, start_worker

from ..support import REPO_ROOT

LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
# Short thinks and tasks, so a few seconds of load finish many tasks.
FAST_MIX = (
    "--think-min", "0.05", "--think-max", "0.3",
    "--duration-dist", "uniform", "--duration-mean", "0.05", "--duration-max", "0.2",
)  # fmt: skip


@dataclass
class RunningService:
    api: Process
    worker: Process

    @property
    def url(self) -> str:
        return self.api.base_url


@pytest.fixture
def service(redis_url: str) -> Iterator[RunningService]:
    """The api and one worker as real processes against the test's Redis."""
    api = start_api(redis_url)
    worker: Process | None = None
    try:
        worker = start_worker(redis_url, MAX_CONCURRENCY="50")
        yield RunningService(api, worker)
    finally:
        for process in (worker, api):
            if process is not None:
                process.close()


def locust_command(host: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", host, *args]


def locust_env(**variables: str) -> dict[str, str]:
    """The test's environment minus any LOCUST_* left over from the shell, plus `variables`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOCUST_")}
    env.update(variables)
    return env


def run_locust(
    host: str, args: Sequence[str], cwd: Path, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        locust_command(host, *args),
        cwd=cwd,
        env=locust_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
