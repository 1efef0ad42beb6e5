"""The whole service as it runs in production: api and workers as real processes."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ..support.http import client_per_thread
from .conftest import Start

pytestmark = pytest.mark.slow


def finished_count(metrics_text: str) -> int:
    return int(
        sum(
            float(value)
            for value in re.findall(
                r'^fastapi_redis_mini_tasks_finished_total\{status="DONE"\} (\S+)$',
                metrics_text,
                re.MULTILINE,
            )
        )
    )


def test_a_task_is_queued_run_and_done(api: Start, worker: Start) -> None:
    server = api()
    worker()
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        body = {"prompt": "the quick brown fox", "params": {"duration": 0.7, "model": "m-2"}}
        submitted = client.post("/tasks", json=body)
        assert submitted.status_code == 202
        task_id = submitted.json()["task_id"]
        statuses: list[str] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = client.get(f"/tasks/{task_id}").json()["status"]
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            if status == "DONE":
                break
            time.sleep(0.05)
        assert statuses[-2:] == ["RUNNING", "DONE"]
        task = client.get(f"/tasks/{task_id}").json()
        assert task["result"]["model"] == "m-2"
        assert task["result"]["output"].endswith("fox brown quick the")
        assert task["finished_at"] - task["started_at"] >= 0.7

        again = client.post("/tasks", json=body)
        assert again.status_code == 200
        assert again.json()["cached"] is True
        assert again.json()["result"] == task["result"]


def test_failed_and_timed_out_tasks_carry_their_error(api: Start, worker: Start) -> None:
    server = api()
    simulated = worker()
    with httpx.Client(base_url=server.base_url, timeout=20) as client:
        body = {"prompt": "x", "params": {"fail": True}}
        task_id = client.post("/tasks", json=body).json()["task_id"]
        failed = client.get(f"/tasks/{task_id}", params={"wait": 10}).json()
        assert (failed["status"], failed["error"]) == (
            "FAILED",
            "TaskFailedError: simulated failure requested by params.fail",
        )
        assert simulated.stop() == 0

        hanging = worker(
            TASK_HANDLER="tests.support.handlers:hang", TASK_TIMEOUT="0.5", MAX_TASK_DURATION="0.5"
        )
        task_id = client.post("/tasks", json={"prompt": "slow"}).json()["task_id"]
        timed_out = client.get(f"/tasks/{task_id}", params={"wait": 10}).json()
        assert (timed_out["status"], timed_out["error"]) == ("FAILED", "timeout after 0.5s")
        assert hanging.stop() == 0


def test_long_poll_answers_when_the_task_ends(api: Start, worker: Start) -> None:
    server = api()
    worker()
    with httpx.Client(base_url=server.base_url, timeout=40) as client:
        task_id = client.post("/tasks", json={"prompt": "p", "params": {"duration": 1.0}}).json()[
            "task_id"
        ]
        started = time.monotonic()
        task = client.get(f"/tasks/{task_id}", params={"wait": 30}).json()
        elapsed = time.monotonic() - started
    assert task["status"] == "DONE"
    assert 0.8 < elapsed < 5


def test_two_workers_share_the_stream_and_run_each_task_once(api: Start, worker: Start) -> None:
    server = api(WEB_CONCURRENCY="2")
    workers = [worker(MAX_CONCURRENCY="20"), worker(MAX_CONCURRENCY="20")]
    count = 200
    with httpx.Client(base_url=server.base_url, timeout=30) as client:

        def submit(i: int) -> str:
            body = {"prompt": f"task {i}", "params": {"duration": 0.05}}
            response = own().post("/tasks", json=body)
            assert response.status_code == 202
            task_id: str = response.json()["task_id"]
            return task_id

        with client_per_thread(client) as own, ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(count)))
            tasks = list(pool.map(lambda t: own().get(f"/tasks/{t}?wait=20").json(), ids))
    assert [t["status"] for t in tasks] == ["DONE"] * count
    assert all(t["attempts"] == 1 for t in tasks)
    per_worker = [finished_count(httpx.get(w.base_url + "/metrics").text) for w in workers]
    print(f"tasks per worker: {per_worker}")
    assert sum(per_worker) == count
    assert min(per_worker) > 0


def test_every_run_leaves_exactly_one_finished_line_in_the_workers_log(
    api: Start, worker: Start
) -> None:
    """The lines of runs ending together reach logging as one record: none may be lost or
    doubled, and each keeps its own task's status."""
    server = api(SUBMIT_RATE_PER_KEY="0")
    running = worker(LOG_FORMAT="json", MAX_CONCURRENCY="50")
    expected: dict[str, str] = {}
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        for i in range(300):
            body = {"prompt": f"log line {i}", "params": {"fail": i % 7 == 0}}
            submitted = client.post("/tasks", json=body)
            assert submitted.status_code == 202, submitted.text
            expected[submitted.json()["task_id"]] = "FAILED" if i % 7 == 0 else "DONE"
        deadline = time.monotonic() + 60
        waiting = set(expected)
        while waiting and time.monotonic() < deadline:
            waiting = {t for t in waiting if client.get(f"/tasks/{t}").json()["status"] not in
                       ("DONE", "FAILED")}  # fmt: skip
            time.sleep(0.1)
        assert not waiting, f"{len(waiting)} tasks not final in 60 s"
    running.close()
    records = [json.loads(line) for line in running.log.splitlines() if line.startswith("{")]
    finished = [r for r in records if r["message"].startswith("task finished")]
    assert sorted(r["task_id"] for r in finished) == sorted(expected)
    assert {r["task_id"]: r["status"] for r in finished} == expected
    assert all(r["level"] == "INFO" and r["attempt"] == 1 for r in finished)
