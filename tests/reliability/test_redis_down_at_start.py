"""A worker that starts while Redis is still unreachable (a fresh install, Redis rescheduled):
it waits for Redis without looking dead to its liveness probe, and SIGTERM still stops it.
"""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest

from fastapi_redis_mini_harness.http import tls_context
from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._chaos import wait_until
from .conftest import Launcher

pytestmark = pytest.mark.slow

STALL_SECONDS = 30  # the worker's /healthz calls itself stalled after this long


def test_sigterm_stops_a_worker_still_waiting_for_redis(launch: Launcher) -> None:
    worker = launch.worker(f"redis://127.0.0.1:{free_port()}/0", SHUTDOWN_GRACE="5")
    time.sleep(1.0)  # it is now retrying its first Redis call
    stopping = time.monotonic()
    worker.signal(signal.SIGTERM)
    try:
        exit_code: int | None = worker.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        exit_code = None
    stopped_in = time.monotonic() - stopping
    print(f"\nreliability[sigterm-before-redis]: exit_code={exit_code} after_s={stopped_in:.1f}")
    assert exit_code == 0, worker.log[-2000:]


def test_a_worker_waiting_for_redis_at_start_stays_live_and_then_works(
    launch: Launcher,
) -> None:
    server = RedisServer()  # its port is chosen now; the server starts later
    try:
        worker = launch.worker(server.url)
        api = launch.api(server.url, wait=False)
        answers: list[int] = []
        deadline = time.monotonic() + STALL_SECONDS + 3
        while time.monotonic() < deadline:
            answers.append(
                httpx.get(worker.base_url + "/healthz", timeout=5, verify=tls_context()).status_code
            )
            time.sleep(1.0)
        server.start()
        api.wait_until_answers("/readyz", timeout=40)
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            task_id = client.post("/tasks", json={"prompt": "late"}).json()["task_id"]
            done = wait_until(
                lambda: client.get(f"/tasks/{task_id}").json()["status"] == "DONE", 20
            )
    finally:
        server.close()
    print(f"\nreliability[redis-late]: liveness_answers={sorted(set(answers))} done={done}")
    # A liveness failure here would have the kubelet restart a worker that is only waiting.
    assert set(answers) == {200}
    assert done
