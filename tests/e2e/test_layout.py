"""Real processes that disagree on the queue's layout: the one that starts second says so in
an error line naming both layouts and its settings. Neither is stopped: the record outlives
the processes that made it, so a mismatch with it is no proof that the other side still runs."""

from __future__ import annotations

import httpx

from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.processes import Process, start_worker

from ..support import REPO_ROOT
from .conftest import Start


def test_a_worker_without_the_apis_lanes_says_why_its_tasks_wait(
    api: Start, redis_url: str, services: list[Process]
) -> None:
    # One partition for both, so that only the lanes differ (on a cluster, lanes off would
    # also give sixteen partitions).
    server = api(PRIORITY_LANES="true", QUEUE_PARTITIONS="1")
    body = {"prompt": "waits in a lane", "priority": "high"}
    answer = httpx.post(f"{server.base_url}/tasks", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    plain = {"PRIORITY_LANES": "false", "QUEUE_PARTITIONS": "1"}
    wrong = start_worker(redis_url, plain, cwd=REPO_ROOT)
    services.append(wrong)
    line = "was last used laid out as partitions=1 priority_lanes=true"
    poll(lambda: line in wrong.log, 20, 0.1, lambda: f"no warning:\n{wrong.log}")
    log = wrong.log
    assert "ERROR" in log.split(line)[0].splitlines()[-1], log
    assert "lays it out as partitions=1 priority_lanes=false (QUEUE_PARTITIONS=1; " in log, log
    # It runs, and the task waits in its lane, untouched: what the warning is about.
    url = f"{server.base_url}/tasks/{answer.json()['task_id']}"
    assert wrong.alive()
    assert httpx.get(url, timeout=10).json()["status"] == "PENDING"
    # A worker of the api's layout runs it.
    right = {"PRIORITY_LANES": "true", "QUEUE_PARTITIONS": "1"}
    services.append(start_worker(redis_url, right, cwd=REPO_ROOT))
    poll(lambda: httpx.get(url, timeout=10).json()["status"] == "DONE", 30, 0.1, "never DONE")


def test_an_api_of_another_layout_than_the_running_worker_says_so_and_serves(
    api: Start, worker: Start
) -> None:
    worker(QUEUE_PARTITIONS="2")
    late = api(QUEUE_PARTITIONS="3")
    log = late.log
    assert "was last used laid out as partitions=2 priority_lanes=false" in log, log
    assert "lays it out as partitions=3 priority_lanes=false (QUEUE_PARTITIONS=3;" in log, log
    assert "Traceback" not in log
    assert httpx.get(f"{late.base_url}/healthz", timeout=10).status_code == 200
