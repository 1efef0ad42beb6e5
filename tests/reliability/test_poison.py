"""A task that kills every worker that runs it ends FAILED in the dead-letter stream."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from functools import partial

import httpx
import pytest

from fastapi_redis_mini_harness.processes import Process

from ..support import REPO_ROOT
from ._chaos import FINAL, Tally, collect, submit_all, wait_until
from .conftest import Launcher

pytestmark = pytest.mark.slow

MAX_DELIVERIES = 3
POISON_ENV = {
    "TASK_HANDLER": "tests.support.handlers:poison",
    "MAX_DELIVERIES": str(MAX_DELIVERIES),
    "CLAIM_IDLE": "1",
    # One task at a time, so the poison takes down no innocent task with it.
    "MAX_CONCURRENCY": "1",
}


def test_a_poison_task_is_dead_lettered_after_max_deliveries(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(redis_url)
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        poison_id = submit_all(client, [{"prompt": "poison"}])[0]
        innocent = submit_all(client, [{"prompt": f"fine {i}"} for i in range(10)])

        started = time.monotonic()
        deaths = restart_workers_until_final(launch, redis_url, client, poison_id, POISON_ENV)
        dead_lettered_in = time.monotonic() - started
        tasks = collect(client, [poison_id, *innocent], timeout=30)
        listed = _admin(redis_url, "dead-letter", "list")

    poison = tasks[poison_id]
    tally = Tally.of(tasks)
    tally.report(
        "poison",
        max_deliveries=MAX_DELIVERIES,
        worker_deaths=len(deaths),
        dead_lettered_after_s=round(dead_lettered_in, 1),
    )
    assert deaths == [17] * MAX_DELIVERIES  # the handler's os._exit(17), once per delivery
    assert poison["status"] == "FAILED"
    assert poison["error"] == (
        f"dead-lettered: delivered {MAX_DELIVERIES} times without finishing "
        f"(MAX_DELIVERIES={MAX_DELIVERIES})"
    )
    assert tally.lost == 0
    assert (tally.done, tally.failed) == (len(innocent), 1)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 1
    assert f"task={poison_id}" in lines[0]
    assert "dead-lettered" in lines[0]


def restart_workers_until_final(
    launch: Launcher,
    redis_url: str,
    client: httpx.Client,
    task_id: str,
    env: Mapping[str, str],
) -> list[int]:
    """Start a worker each time one dies, until the task is final; the exit codes of the dead."""

    def gone_or_final(worker: Process) -> bool:
        if worker.process.poll() is not None:
            return True
        return client.get(f"/tasks/{task_id}").json()["status"] in FINAL

    deaths: list[int] = []
    for _ in range(MAX_DELIVERIES + 2):  # one more worker than the poison can kill, and spare
        worker = launch.worker(redis_url, env, wait=False)
        wait_until(partial(gone_or_final, worker), 40)
        if worker.process.poll() is None:
            return deaths
        deaths.append(worker.process.returncode)
    raise AssertionError(f"workers kept dying: {deaths}")


def test_tasks_running_beside_a_poison_task_are_not_dead_lettered_with_it(
    redis_url: str, launch: Launcher
) -> None:
    # Several tasks at a time: the innocent ones are in flight each time the poison kills.
    env = {**POISON_ENV, "MAX_CONCURRENCY": "5"}
    api = launch.api(redis_url)
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        bodies = [{"prompt": f"beside {i}", "params": {"duration": 1.0}} for i in range(4)]
        innocent = submit_all(client, bodies)
        poison_id = submit_all(client, [{"prompt": "poison"}])[0]
        deaths = restart_workers_until_final(launch, redis_url, client, poison_id, env)
        tasks = collect(client, [poison_id, *innocent], timeout=30)

    tally = Tally.of(tasks)
    tally.report(
        "poison-bystanders",
        worker_deaths=len(deaths),
        bystanders=[tasks[task_id]["status"] for task_id in innocent],
    )
    assert tasks[poison_id]["status"] == "FAILED"
    assert tally.lost == 0
    # A crash costs every task in flight a delivery; the ones that only stood beside the
    # poison must not share its fate.
    assert [tasks[task_id]["status"] for task_id in innocent] == ["DONE"] * len(innocent)


def _admin(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.admin", *args],
        env={**os.environ, "REDIS_URL": redis_url},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
