"""SIGTERM, as every Kubernetes scale-down sends it: the worker drains, or hands tasks back."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support.http import client_per_thread
from ._chaos import Tally, collect, in_flight, submit_all, wait_until, worker_figures_once_counted
from .conftest import Launcher

pytestmark = pytest.mark.slow


def test_sigterm_finishes_in_flight_tasks_within_the_grace_and_exits_0(
    redis_url: str, launch: Launcher
) -> None:
    concurrency, grace, duration = 4, 8.0, 2.0
    api = launch.api(redis_url)
    worker = launch.worker(
        redis_url, MAX_CONCURRENCY=str(concurrency), SHUTDOWN_GRACE=str(grace), CLAIM_IDLE="30"
    )
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        bodies = [{"prompt": f"drain {i}", "params": {"duration": duration}} for i in range(8)]
        ids = submit_all(client, bodies)
        assert wait_until(lambda: in_flight(worker) == concurrency, 20), worker.log
        stopping = time.monotonic()
        exit_code = worker.stop(timeout=grace + 15)
        stopped_in = time.monotonic() - stopping
        stopped_at = time.time()
        after_stop = {task_id: client.get(f"/tasks/{task_id}").json() for task_id in ids}
        drained = [t for t in after_stop.values() if t["status"] == "DONE"]
        # The unread half was never touched: the next worker takes it.
        launch.worker(redis_url, MAX_CONCURRENCY=str(concurrency))
        tasks = collect(client, ids, timeout=30)

    tally = Tally.of(tasks)
    tally.report(
        "sigterm-drain",
        in_flight_at_sigterm=concurrency,
        drained=len(drained),
        exit_code=exit_code,
        stopped_in_s=round(stopped_in, 2),
        grace_s=grace,
    )
    assert exit_code == 0
    assert stopped_in < grace
    assert len(drained) == concurrency
    assert all(t["finished_at"] <= stopped_at and t["attempts"] == 1 for t in drained)
    assert sorted(t["status"] for t in after_stop.values()) == ["DONE"] * 4 + ["PENDING"] * 4
    assert tally.lost == 0
    assert tally.done == len(ids)
    assert all(task["attempts"] == 1 for task in tasks.values())


def test_tasks_longer_than_the_grace_are_released_and_another_worker_completes_them(
    redis_url: str, launch: Launcher
) -> None:
    concurrency, grace, duration = 4, 1.5, 6.0
    api = launch.api(redis_url)
    # CLAIM_IDLE is long, so only a release (not a reclaim) can explain a quick recovery.
    env = {"MAX_CONCURRENCY": str(concurrency), "SHUTDOWN_GRACE": str(grace), "CLAIM_IDLE": "60"}
    leaving = launch.worker(redis_url, env)
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        bodies = [{"prompt": f"release {i}", "params": {"duration": duration}} for i in range(4)]
        ids = submit_all(client, bodies)
        assert wait_until(lambda: in_flight(leaving) == concurrency, 20), leaving.log
        stopping = time.monotonic()
        exit_code = leaving.stop(timeout=grace + 15)
        stopped_in = time.monotonic() - stopping
        after_stop = [client.get(f"/tasks/{task_id}").json()["status"] for task_id in ids]
        successor = launch.worker(redis_url, env)
        tasks = collect(client, ids, timeout=40)
        recovered_in = time.monotonic() - stopping

    [figures] = worker_figures_once_counted([successor], done=len(ids))
    tally = Tally.of(tasks)
    tally.report(
        "sigterm-release",
        released=after_stop.count("PENDING"),
        exit_code=exit_code,
        stopped_in_s=round(stopped_in, 2),
        grace_s=grace,
        successor_done=figures["done"],
        successor_reclaimed=figures["reclaimed"],
        all_done_after_sigterm_s=round(recovered_in, 1),
    )
    assert exit_code == 0
    assert stopped_in < grace + 3
    assert after_stop == ["PENDING"] * 4  # handed back, not left RUNNING and not half-written
    assert tally.lost == 0
    assert tally.done == len(ids)
    assert (figures["done"], figures["reclaimed"]) == (len(ids), 0)
    assert all(task["attempts"] == 1 for task in tasks.values())


def test_sigterm_lets_the_api_answer_requests_in_flight_then_exit_0(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(redis_url, WEB_CONCURRENCY="2", DRAIN_TIMEOUT="10")
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        task_id = client.post("/tasks", json={"prompt": "nobody runs this"}).json()["task_id"]
        with client_per_thread(client) as own, ThreadPoolExecutor(4) as pool:
            polls = [pool.submit(lambda: own().get(f"/tasks/{task_id}?wait=3")) for _ in range(4)]
            time.sleep(1.0)  # the long-polls are now waiting inside the api
            stopping = time.monotonic()
            exit_code = api.stop(timeout=30)
            stopped_in = time.monotonic() - stopping
            answers = [poll.result(timeout=30) for poll in polls]
    print(
        f"\nreliability[api-sigterm]: in_flight={len(answers)} "
        f"answered={[a.status_code for a in answers]} exit_code={exit_code} "
        f"stopped_in_s={stopped_in:.2f}"
    )
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert all(a.json()["status"] == "PENDING" for a in answers)
    assert exit_code == 0
    assert stopped_in >= 1.0  # it waited for the long-polls rather than cutting them off


def test_sigterm_while_redis_is_down_exits_0_and_loses_nothing(launch: Launcher) -> None:
    grace, chart_margin = 2.0, 15.0  # the chart gives pods shutdownGrace + 15 s by default
    server = RedisServer(appendonly=True)
    server.start()
    try:
        api = launch.api(server.url)
        env = {"SHUTDOWN_GRACE": str(grace), "CLAIM_IDLE": "2", "MAX_CONCURRENCY": "4"}
        leaving = launch.worker(server.url, env)
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            # Two finish inside the grace, two are released; no outcome can be written.
            bodies = [
                {"prompt": f"outage drain {i}", "params": {"duration": 1.0 if i < 2 else 4.0}}
                for i in range(4)
            ]
            ids = submit_all(client, bodies)
            assert wait_until(lambda: in_flight(leaving) == 4, 20), leaving.log
            server.stop(kill=True)
            stopping = time.monotonic()
            leaving.signal(signal.SIGTERM)
            try:
                exit_code: int | None = leaving.process.wait(timeout=grace + chart_margin + 10)
            except subprocess.TimeoutExpired:
                exit_code = None
            stopped_in = time.monotonic() - stopping
            server.start()
            launch.worker(server.url, env)
            tasks = collect(client, ids, timeout=40)
    finally:
        server.close()
    tally = Tally.of(tasks)
    tally.report(
        "sigterm-redis-down",
        exit_code=exit_code,
        stopped_in_s=round(stopped_in, 1),
        grace_s=grace,
        attempts=[task["attempts"] for task in tasks.values()],
    )
    assert exit_code == 0
    assert stopped_in < grace + chart_margin
    assert tally.lost == 0
    assert tally.done == len(ids)
