"""Handlers that behave like models, not like asyncio.sleep: two real workers on a real Redis.

A handler that blocks (a synchronous model, or an async handler making one synchronous call)
must not let the other worker reclaim its task while it runs, and one that never returns
must neither hold its task for good nor leave a worker that looks healthy.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from fastapi_redis_mini_harness.http import tls_context
from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.processes import Process

from ._chaos import collect, metric, scrape, submit_all
from .conftest import Launcher

pytestmark = pytest.mark.slow

CLAIM_IDLE = 2.0
BLOCK = 3 * CLAIM_IDLE

FAST_RECLAIM = {
    "CLAIM_IDLE": str(CLAIM_IDLE),
    "TASK_TIMEOUT": "30",
    "MAX_TASK_DURATION": "30",
    "LOG_FORMAT": "text",
}


def runs(path: Path) -> list[str]:
    """The pids of the processes that ran the task, one per run."""
    return path.read_text().split() if path.exists() else []


def loop_blocks(workers: list[Process]) -> float:
    return sum(metric(scrape(w), "fastapi_redis_mini_event_loop_blocks_total") for w in workers)


def test_a_sync_handler_that_blocks_for_three_claim_idles_runs_once(
    redis_url: str, launch: Launcher, tmp_path: Path
) -> None:
    api = launch.api(redis_url)
    workers = launch.workers(
        redis_url, 2, TASK_HANDLER="tests.support.handlers:BlockingModel", **FAST_RECLAIM
    )
    ran = tmp_path / "runs"
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        [task_id] = submit_all(
            client, [{"prompt": "slow model", "params": {"block": BLOCK, "runs": str(ran)}}]
        )
        task = collect(client, [task_id], timeout=BLOCK + 30)[task_id]
    print(f"\nreliability[sync-block]: status={task['status']} runs={len(runs(ran))}")
    assert task["status"] == "DONE", task
    assert task["attempts"] == 1
    assert task["result"]["thread"].startswith("handler")
    assert len(runs(ran)) == 1
    # Blocking in a thread holds no loop.
    assert loop_blocks(workers) == 0


def test_an_async_handler_that_blocks_its_loop_runs_once_and_is_counted(
    redis_url: str, launch: Launcher, tmp_path: Path
) -> None:
    api = launch.api(redis_url)
    workers = launch.workers(
        redis_url, 2, TASK_HANDLER="tests.support.handlers:LoopBlocker", **FAST_RECLAIM
    )
    ran = tmp_path / "runs"
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        [task_id] = submit_all(
            client, [{"prompt": "blocks", "params": {"block": BLOCK, "runs": str(ran)}}]
        )
        # While the loop is held, the worker still answers its probes from its sidecar.
        poll(lambda: runs(ran), 20, what="the task never started")
        for worker in workers:
            assert (
                httpx.get(worker.base_url + "/healthz", timeout=2, verify=tls_context()).status_code
                == 200
            )
        task = collect(client, [task_id], timeout=BLOCK + 30)[task_id]
    print(f"\nreliability[loop-block]: status={task['status']} runs={len(runs(ran))}")
    assert task["status"] == "DONE", task
    assert task["attempts"] == 1
    assert len(runs(ran)) == 1
    assert loop_blocks(workers) == 1
    [runner] = [w for w in workers if str(w.pid) == runs(ran)[0]]
    assert "has blocked the event loop" in runner.log
    assert "tests.support.handlers:LoopBlocker" in runner.log


def test_a_handler_that_hangs_is_retried_elsewhere_and_fails_its_workers_liveness(
    redis_url: str, launch: Launcher, tmp_path: Path
) -> None:
    timeout, grace = 4.0, 3.0
    env = {
        "TASK_HANDLER": "tests.support.handlers:HangsOnFirstRun",
        "CLAIM_IDLE": str(CLAIM_IDLE),
        "TASK_TIMEOUT": str(timeout),
        "MAX_TASK_DURATION": str(timeout),
        "LIVENESS_GRACE": str(grace),
        "LOG_FORMAT": "text",
    }
    api = launch.api(redis_url)
    first = launch.worker(redis_url, env)
    ran, marker = tmp_path / "runs", tmp_path / "marker"
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        params = {"runs": str(ran), "marker": str(marker)}
        [task_id] = submit_all(client, [{"prompt": "hangs", "params": params}])
        poll(lambda: runs(ran), 20, what="the task never started")
        second = launch.worker(redis_url, env)
        task = collect(client, [task_id], timeout=timeout + grace + 30)[task_id]

        def liveness_failed() -> dict[str, str] | None:
            answer = httpx.get(first.base_url + "/healthz", timeout=2, verify=tls_context())
            return answer.json() if answer.status_code == 503 else None

        health = poll(liveness_failed, timeout + grace + 10, what="the hung worker looks alive")
    print(f"\nreliability[hang]: status={task['status']} runs={runs(ran)} health={health}")
    assert task["status"] == "DONE", task
    assert task["attempts"] == 2
    assert runs(ran) == [str(first.pid), str(second.pid)]
    assert health["status"] == "hung"
    assert "TASK_TIMEOUT + LIVENESS_GRACE" in health["reason"]
    assert metric(scrape(first), "fastapi_redis_mini_event_loop_blocks_total") == 1
