"""Real processes that disagree on the queue's layout: the one that comes second exits at
start with a message naming the settings, instead of using keys nobody else reads."""

from __future__ import annotations

import httpx

from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker

from ..support import REPO_ROOT
from .conftest import Start


def exit_code(process: Process, timeout: float = 30) -> int:
    poll(lambda: not process.alive(), timeout, 0.1, lambda: f"still running:\n{process.log}")
    code = process.process.returncode
    assert code is not None
    return code


def test_a_worker_without_the_apis_lanes_exits_and_says_why(
    api: Start, redis_url: str, services: list[Process]
) -> None:
    # One partition for both, so that only the lanes differ (on a cluster, lanes off would
    # also give sixteen partitions).
    server = api(PRIORITY_LANES="true", QUEUE_PARTITIONS="1")
    body = {"prompt": "waits in a lane", "priority": "high"}
    answer = httpx.post(f"{server.base_url}/tasks", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    worker = start_worker(
        redis_url, {"PRIORITY_LANES": "false", "QUEUE_PARTITIONS": "1"}, wait=False, cwd=REPO_ROOT
    )
    services.append(worker)
    assert exit_code(worker) == 1
    log = worker.log
    assert "is laid out as partitions=1 priority_lanes=true" in log, log
    assert "this process's settings give partitions=1 priority_lanes=false" in log, log
    assert "(QUEUE_PARTITIONS=1; PRIORITY_LANES=false)" in log, log
    # The task waits in its lane, untouched, for a worker of the right layout, which runs it.
    url = f"{server.base_url}/tasks/{answer.json()['task_id']}"
    assert httpx.get(url, timeout=10).json()["status"] == "PENDING"
    right = {"PRIORITY_LANES": "true", "QUEUE_PARTITIONS": "1"}
    services.append(start_worker(redis_url, right, cwd=REPO_ROOT))
    poll(lambda: httpx.get(url, timeout=10).json()["status"] == "DONE", 30, 0.1, "never DONE")


def test_an_api_of_another_layout_than_the_running_worker_does_not_start(
    worker: Start, redis_url: str, services: list[Process]
) -> None:
    worker(QUEUE_PARTITIONS="2")
    late = start_api(redis_url, {"QUEUE_PARTITIONS": "3"}, wait=False)
    services.append(late)
    assert exit_code(late) == 2
    log = late.log
    # One line, before gunicorn starts: no traceback.
    assert "fastapi-redis-mini: invalid configuration: the queue 'task_stream'" in log, log
    assert "Traceback" not in log
    assert "gunicorn" not in log
    assert "is laid out as partitions=2 priority_lanes=false" in log, log
    assert "settings give partitions=3 priority_lanes=false (QUEUE_PARTITIONS=3;" in log, log
