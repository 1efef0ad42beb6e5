"""How the worker calls a handler: sync ones in its pool, on time, with load() and close()."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Mapping
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_redis_mini.core.handlers import SimulatedInference
from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker._handler import HandlerRunner, is_async
from fastapi_redis_mini.worker._http import build_app
from fastapi_redis_mini.worker.runner import Worker, WorkerFailed

from ..support.handlers import BlockingModel, DeafToTerm, LoopBlocker


async def submit(queue: RedisTaskQueue, prompt: str, **params: object) -> str:
    task = TaskCreate(prompt=prompt, params=dict(params))
    return (await queue.submit(task, signature=request_signature(task))).task_id


class SlowToLoad:
    """Loads for `seconds` in a thread, as weights read from disk would; counts its steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.loads = 0
        self.closes = 0

    def load(self) -> None:
        time.sleep(self.seconds)
        self.loads += 1

    async def close(self) -> None:
        self.closes += 1

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        return {"loads": self.loads}


class FailsToLoad:
    async def load(self) -> None:
        raise OSError("weights not found")

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        return None


def test_a_handler_is_async_when_calling_it_makes_a_coroutine() -> None:
    async def function(prompt: str, params: Mapping[str, Any]) -> Any:
        return None

    assert is_async(function)
    assert is_async(SimulatedInference(1))
    assert is_async(LoopBlocker(1))
    assert not is_async(BlockingModel(1))
    assert not is_async(lambda prompt, params: None)


async def test_an_async_handler_is_awaited_directly_with_no_thread_hop(settings: Settings) -> None:
    handler = SimulatedInference(1)
    runner = HandlerRunner(handler, settings)
    assert runner.call is handler


async def test_a_sync_handler_runs_in_the_pool_and_leaves_the_loop_free(
    settings: Settings,
) -> None:
    runner = HandlerRunner(BlockingModel(1), settings.model_copy(update={"handler_threads": 2}))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        for _ in range(20):
            ticks += 1
            await asyncio.sleep(0.01)

    calls = [runner.call(f"p{n}", {"block": 0.4}) for n in range(2)]
    results = await asyncio.gather(*calls, tick())
    await runner.close(1)
    assert {r["thread"][:7] for r in results[:2]} == {"handler"}
    assert ticks == 20  # the loop ran while both calls blocked


async def test_a_sync_handler_over_the_timeout_fails_its_task_on_time(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    configured = settings.model_copy(update={"task_timeout": 0.5, "max_task_duration": 0.5})
    own = RedisTaskQueue(connect(configured), configured)
    worker = Worker(own, BlockingModel(1), configured)
    running = asyncio.create_task(worker.run())
    began = time.monotonic()
    task_id = await submit(queue, "stuck", block=3.0)
    record = await queue.wait(task_id, "", 10)
    answered_after = time.monotonic() - began
    # The thread cannot be stopped: it runs on, and is counted until its call returns.
    busy_meanwhile = worker.runner.threads_busy
    worker.stop()
    await asyncio.wait_for(running, 20)
    await own.close()
    assert record is not None
    assert (record.status, record.error) == (TaskStatus.FAILED, "timeout after 0.5s")
    assert answered_after < 2.5  # before the call returned (3 s)
    assert busy_meanwhile == 1


async def test_load_runs_once_before_any_task_and_readyz_says_loading_until_then(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    handler = SlowToLoad(1.0)
    own = RedisTaskQueue(connect(settings), settings)
    worker = Worker(own, handler, settings)
    app = build_app(worker, queue, settings)
    task_id = await submit(queue, "after load")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        running = asyncio.create_task(worker.run())
        await asyncio.sleep(0.3)
        loading = await client.get("/readyz")
        record = await queue.wait(task_id, "", 10)
        ready = await client.get("/readyz")
        worker.stop()
        await asyncio.wait_for(running, 20)
    await own.close()
    assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
    assert ready.status_code == 200
    assert record is not None
    assert record.result == {"loads": 1}  # the task ran after load() returned
    assert (handler.loads, handler.closes) == (1, 1)


async def test_a_handler_that_cannot_load_ends_the_worker_naming_the_handler(
    settings: Settings,
) -> None:
    own = RedisTaskQueue(connect(settings), settings)
    worker = Worker(own, FailsToLoad(), settings)
    with pytest.raises(WorkerFailed, match=r"load\(\) failed with OSError: weights not found"):
        await asyncio.wait_for(worker.run(), 10)
    await own.close()


async def test_a_pool_process_that_ignores_sigterm_is_killed_at_close(
    settings: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    configured = settings.model_copy(
        update={
            "handler_pool": "process",
            "handler_threads": 1,
            "task_handler": "tests.support.handlers:DeafToTerm",
        }
    )
    runner = HandlerRunner(DeafToTerm(1), configured)
    await runner.load()  # the process is up and has loaded: SIGTERM is ignored from now on
    [child] = multiprocessing.active_children()
    # A call stuck in the process: the pool's own shutdown cannot end it either.
    runs = tmp_path / "runs"
    stuck = runner.call("stuck", {"block": 60, "runs": str(runs)})
    for _ in range(100):  # bounded: 10 s
        if runs.exists():
            break
        await asyncio.sleep(0.1)
    assert runs.exists(), "the call never started in the pool process"
    began = time.monotonic()
    await runner.close(within=1.0)
    assert multiprocessing.active_children() == []
    assert child.exitcode == -signal.SIGKILL  # SIGTERM alone did not end it
    assert 1.0 <= time.monotonic() - began < 5
    assert f"handler pool process {child.pid} outlived SIGTERM; killed" in caplog.text
    # The call's awaiter is not left hanging: the pool reports its process gone.
    with pytest.raises(BrokenProcessPool):
        await asyncio.wait_for(stuck, 5)


async def test_with_handler_pool_process_a_sync_handler_runs_loaded_in_other_processes(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    configured = settings.model_copy(
        update={
            "handler_pool": "process",
            "handler_threads": 2,
            "task_handler": "tests.support.handlers:BlockingModel",
        }
    )
    own = RedisTaskQueue(connect(configured), configured)
    worker = Worker(own, BlockingModel(1), configured)
    running = asyncio.create_task(worker.run())
    task_ids = [await submit(queue, f"in a process {n}") for n in range(3)]
    records = [await queue.wait(task_id, "", 60) for task_id in task_ids]
    worker.stop()
    await asyncio.wait_for(running, 20)
    await own.close()
    results: list[dict[str, Any]] = [
        r.result for r in records if r is not None and isinstance(r.result, dict)
    ]
    assert len(results) == 3
    assert {r["loaded"] for r in results} == {True}  # load() ran in each process
    assert os.getpid() not in {r["pid"] for r in results}
    assert multiprocessing.active_children() == []  # terminated at shutdown
