"""The api and the worker as real processes, the way they run in production."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import httpx

from .polling import poll
from .redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def service_env(redis_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a service under test: the test's Redis, readable logs, short timers."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "PROMETHEUS_", "WEB_CONCURRENCY"))
    }
    env.update(
        REDIS_URL=redis_url,
        LOG_FORMAT="text",
        HOST="127.0.0.1",
        WEB_CONCURRENCY="1",
        CLAIM_IDLE="30",
        SHUTDOWN_GRACE="10",
        DRAIN_TIMEOUT="10",
    )
    env.update(overrides)
    return env


class Service:
    """A running service process with its log in a file; stopping it is bounded in time."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], base_url: str) -> None:
        self.name = name
        self.base_url = base_url
        self.log_path = Path(tempfile.mkstemp(prefix=f"frm-{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            args,
            env=dict(env),
            cwd=REPO_ROOT,  # so TASK_HANDLER=tests.support.handlers:NAME imports
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_until_answers(self, path: str, timeout: float = 20.0) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log}"
                )
            try:
                return httpx.get(self.base_url + path, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        poll(answers, timeout, 0.1, lambda: f"{self.name} did not answer {path}:\n{self.log}")

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL after the timeout)."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()


def _wait_or_close(service: Service, path: str) -> None:
    try:
        service.wait_until_answers(path)
    except BaseException:
        service.close()  # a service that never became ready must not outlive the test
        raise


def start_api(
    redis_url: str,
    env: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    wait: bool = True,
    **more: str,
) -> Service:
    """Start `python -m fastapi_redis_mini.api`; env and more are extra variables."""
    port = port or free_port()
    service = Service(
        "api",
        [sys.executable, "-m", "fastapi_redis_mini.api"],
        service_env(
            redis_url,
            PORT=str(port),
            # Each api counts into its own directory (the api empties it at start), unless
            # the test names one.
            **{
                "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="frm-metrics-"),
                **(env or {}),
                **more,
            },
        ),
        f"http://127.0.0.1:{port}",
    )
    if wait:
        _wait_or_close(service, "/readyz")
    return service


def start_worker(
    redis_url: str,
    env: Mapping[str, str] | None = None,
    *,
    metrics_port: int | None = None,
    wait: bool = True,
    **more: str,
) -> Service:
    """Start `python -m fastapi_redis_mini.worker`; env and more are extra variables."""
    port = metrics_port or free_port()
    service = Service(
        "worker",
        [sys.executable, "-m", "fastapi_redis_mini.worker"],
        service_env(redis_url, METRICS_PORT=str(port), **{**(env or {}), **more}),
        f"http://127.0.0.1:{port}",
    )
    if wait:
        _wait_or_close(service, "/healthz")
    return service
