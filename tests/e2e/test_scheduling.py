"""Scheduling with the api and workers as real processes: single-flight, priority lanes and
their starvation guard, fair turns between API keys, delayed starts and deadlines.

The worker runs tests.support.handlers:Recorder, which logs each run's prompt and start time
to a file, so the order and times the model saw are read from there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..support.http import client_per_thread
from .conftest import Start

pytestmark = pytest.mark.slow

RECORDER = "tests.support.handlers:Recorder"


def runs(log: Path) -> list[tuple[str, float]]:
    """(prompt, start time) of every run the handler saw, in order."""
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    return [(prompt, float(at)) for prompt, at in (line.split("\t") for line in lines)]


def wait_for_runs(log: Path, count: int, timeout: float = 30) -> list[tuple[str, float]]:
    deadline = time.monotonic() + timeout
    while len(runs(log)) < count:
        assert time.monotonic() < deadline, f"{len(runs(log))} of {count} runs"
        time.sleep(0.05)
    return runs(log)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "runs.log"


def body(prompt: str, log: Path, duration: float = 0, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, "params": {"log": str(log), "duration": duration}, **fields}


@pytest.fixture
def client(api: Start, worker: Start) -> Iterator[httpx.Client]:
    """An api with PRIORITY_LANES and one worker running one task at a time."""
    lanes = {"PRIORITY_LANES": "true", "PRIORITY_STARVATION_GUARD": "4"}
    server = api(**lanes)
    worker(TASK_HANDLER=RECORDER, MAX_CONCURRENCY="1", **lanes)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


def test_twenty_identical_concurrent_submits_make_one_task_and_one_model_call(
    client: httpx.Client, log: Path
) -> None:
    request = body("one prompt, many callers", log, duration=0.5)
    with client_per_thread(client) as own, ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: own().post("/tasks", json=request), range(20)))
    assert {answer.status_code for answer in answers} == {202}
    assert len({answer.json()["task_id"] for answer in answers}) == 1
    assert sum(answer.json()["coalesced"] for answer in answers) == 19
    task_id = answers[0].json()["task_id"]
    assert client.get(f"/tasks/{task_id}", params={"wait": 10}).json()["status"] == "DONE"
    time.sleep(0.5)  # room for a second run, were there one
    assert [prompt for prompt, _ in runs(log)] == ["one prompt, many callers"]


def test_high_runs_before_normal_before_low(client: httpx.Client, log: Path) -> None:
    client.post("/tasks", json=body("busy", log, duration=1.0))
    wait_for_runs(log, 1)  # the one slot is taken: the rest wait in their lanes
    for priority in ("low", "normal", "high", "low", "normal", "high"):
        prompt = f"{priority} {time.monotonic_ns()}"
        assert client.post("/tasks", json=body(prompt, log, priority=priority)).status_code == 202
    order = [prompt.split()[0] for prompt, _ in wait_for_runs(log, 7)]
    assert order == ["busy", "high", "high", "normal", "normal", "low", "low"]


def test_low_still_finishes_under_a_steady_high_load(client: httpx.Client, log: Path) -> None:
    client.post("/tasks", json=body("busy", log, duration=1.0))
    wait_for_runs(log, 1)
    low = client.post("/tasks", json=body("low", log, priority="low")).json()["task_id"]
    stop = time.monotonic() + 4
    sent = 0
    while time.monotonic() < stop:
        # More high work arrives than the one slot can take: high never runs out.
        client.post("/tasks", json=body(f"high {sent}", log, duration=0.1, priority="high"))
        sent += 1
        time.sleep(0.02)
    assert client.get(f"/tasks/{low}", params={"wait": 5}).json()["status"] == "DONE"
    order = [prompt for prompt, _ in runs(log)]
    print(f"\nlow ran as run {order.index('low') + 1} of {len(order)}; {sent} high sent")
    # PRIORITY_STARVATION_GUARD=4: the 4th task taken goes to a lower lane with work.
    assert order.index("low") <= 4
    assert len(order) < sent + 1  # high work was still waiting when low ran


def test_a_key_with_a_backlog_does_not_delay_another_keys_task(
    api: Start, worker: Start, log: Path
) -> None:
    lanes = {"PRIORITY_LANES": "true", "API_KEYS": "key-a,key-b"}
    server = api(WEB_CONCURRENCY="2", **lanes)
    worker(TASK_HANDLER=RECORDER, MAX_CONCURRENCY="5", **lanes)
    # 5 slots at 0.2 s a task run 25 of A's tasks a second: while the backlog is submitted
    # most of it stays queued, so a B queued behind it would wait many seconds, not < 1 s.
    backlog, duration = 500, 0.2
    with httpx.Client(base_url=server.base_url, timeout=30) as client:

        def submit_a(i: int) -> None:
            request = body(f"a {i}", log, duration=duration)
            response = own().post("/tasks", json=request, headers={"X-API-Key": "key-a"})
            assert response.status_code == 202

        with client_per_thread(client) as own, ThreadPoolExecutor(16) as pool:
            list(pool.map(submit_a, range(backlog)))
        b = client.post("/tasks", json=body("b", log), headers={"X-API-Key": "key-b"})
        task_id = b.json()["task_id"]
        task = client.get(f"/tasks/{task_id}", params={"wait": 10}, headers={"X-API-Key": "key-b"})
    done = task.json()
    assert done["status"] == "DONE"
    start_delay = done["started_at"] - done["created_at"]
    order = [prompt for prompt, _ in runs(log)]
    ran_before = order.index("b")
    print(
        f"\nkey B's task started {start_delay:.3f} s after its submit, behind {ran_before} runs "
        f"of key A's {backlog} (5 slots)"
    )
    # About one round of the slots: the tasks already handed out, then B's turn.
    assert done["started_at"] - done["created_at"] < 1.0
    assert len(order) < backlog / 2  # A's backlog was far from drained


def test_a_delayed_task_starts_within_a_second_of_its_time(client: httpx.Client, log: Path) -> None:
    submitted_at = time.time()
    answer = client.post("/tasks", json=body("later", log, delay_seconds=2)).json()
    task = client.get(f"/tasks/{answer['task_id']}").json()
    assert task["status"] == "PENDING"
    assert task["run_at"] >= submitted_at + 2
    [(_, started)] = wait_for_runs(log, 1, timeout=10)
    print(f"\nthe delayed task started {started - task['run_at']:.3f} s after its time")
    assert task["run_at"] <= started < task["run_at"] + 1


def test_an_expired_task_never_reaches_the_handler(client: httpx.Client, log: Path) -> None:
    client.post("/tasks", json=body("busy", log, duration=1.5))
    wait_for_runs(log, 1)
    late = client.post("/tasks", json=body("too late", log, deadline_seconds=0.5)).json()
    in_time = client.post("/tasks", json=body("in time", log, deadline_seconds=30)).json()
    expired = client.get(f"/tasks/{late['task_id']}", params={"wait": 10}).json()
    assert expired["status"] == "EXPIRED"
    assert expired["started_at"] is None
    done = client.get(f"/tasks/{in_time['task_id']}", params={"wait": 10}).json()
    assert done["status"] == "DONE"
    assert [prompt for prompt, _ in runs(log)] == ["busy", "in time"]
