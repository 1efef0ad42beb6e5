"""The worker loop in-process on a real Redis: outcomes, retries, timeouts, draining."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import httpx
import pytest
import redis.asyncio
from prometheus_client import REGISTRY

from fastapi_redis_mini.core.handlers import SimulatedInference, TaskHandler
from fastapi_redis_mini.core.models import Task, TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import Finish, FinishVerdict, Job, QueueBusy, QueueState
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker._http import build_app
from fastapi_redis_mini.worker.runner import Worker, WorkerFailed
from fastapi_redis_mini_harness.polling import poll_async

from ..support.handlers import FlakyThenFine, hang, not_json


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[RedisTaskQueue]:
    queue = RedisTaskQueue(connect(settings), settings)
    yield queue
    await queue.close()


Submit = Callable[..., Awaitable[str]]


@pytest.fixture
def submit(queue: RedisTaskQueue) -> Submit:
    async def submit(prompt: str = "p", **params: object) -> str:
        await queue.ensure_group()
        task = TaskCreate(prompt=prompt, params=dict(params))
        return (await queue.submit(task, signature=request_signature(task))).task_id

    return submit


async def wait_final(queue: RedisTaskQueue, task_id: str, seconds: float = 10) -> Task:
    record = await queue.wait(task_id, "", seconds)
    assert record is not None
    assert record.status.is_final, record
    return record


def start(
    settings: Settings, handler: TaskHandler, **overrides: object
) -> tuple[Worker, asyncio.Task[None]]:
    configured = settings.model_copy(update=overrides)
    worker = Worker(RedisTaskQueue(connect(configured), configured), handler, configured)
    return worker, asyncio.create_task(worker.run())


async def stop(worker: Worker, running: asyncio.Task[None]) -> None:
    worker.stop()
    try:
        await asyncio.wait_for(running, 20)
    finally:
        assert isinstance(worker.queue, RedisTaskQueue)
        await worker.queue.close()


async def started(worker: Worker) -> None:
    async def running() -> bool:
        return worker.in_flight > 0

    await poll_async(running, 10, 0.01, "the worker never started the task")


async def test_a_handler_over_the_timeout_fails_the_task(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    worker, running = start(settings, hang(1.0), task_timeout=0.2, max_task_duration=0.2)
    task_id = await submit()
    record = await wait_final(queue, task_id)
    await stop(worker, running)
    assert (record.status, record.error) == (TaskStatus.FAILED, "timeout after 0.2s")


async def test_each_run_times_out_on_its_own_deadline_and_the_others_finish(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    # One timer serves every run: it is set for the first run's deadline, and must then be
    # set again for a run that started later, while a run that ends in time is left alone.
    async def sleeps(prompt: str, params: Mapping[str, Any]) -> Any:
        await asyncio.sleep(float(prompt))
        return {"slept": prompt}

    worker, running = start(settings, sleeps, task_timeout=0.5, max_task_duration=0.5)
    try:
        first = await submit("30")
        await started(worker)
        await asyncio.sleep(0.3)
        later, in_time = await submit("31"), await submit("0.1")
        records = [await wait_final(queue, task_id) for task_id in (first, later, in_time)]
    finally:
        await stop(worker, running)
    assert [(r.status, r.error) for r in records] == [
        (TaskStatus.FAILED, "timeout after 0.5s"),
        (TaskStatus.FAILED, "timeout after 0.5s"),
        (TaskStatus.DONE, None),
    ]
    assert records[2].result == {"slept": "0.1"}
    # Neither run was stopped before its own half second: the later one did not inherit what
    # was left of the first one's. (A loaded machine only makes runs longer.)
    for record in records[:2]:
        assert record.started_at is not None
        assert record.finished_at is not None
        assert record.finished_at - record.started_at >= 0.5, record


async def test_a_retryable_error_is_retried_with_backoff(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    handler = FlakyThenFine(failures=2)
    worker, running = start(settings, handler, retry_backoff=0.2, max_retries=3)
    started = time.monotonic()
    task_id = await submit("flaky")
    record = await wait_final(queue, task_id)
    await stop(worker, running)
    assert (record.status, record.result, record.attempts) == (TaskStatus.DONE, {"calls": 3}, 3)
    assert time.monotonic() - started >= 0.1 + 0.2  # at least half of each backoff ceiling


async def test_retries_run_out_and_the_task_fails(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    worker, running = start(settings, FlakyThenFine(failures=10), retry_backoff=0.05, max_retries=2)
    task_id = await submit("always busy")
    record = await wait_final(queue, task_id)
    await stop(worker, running)
    assert record.status is TaskStatus.FAILED
    assert record.attempts == 3
    assert record.error == "gave up after 3 attempts: RetryableError: busy (call 3)"


async def test_a_result_that_is_not_json_fails_the_task(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    worker, running = start(settings, not_json)
    task_id = await submit()
    record = await wait_final(queue, task_id)
    await stop(worker, running)
    assert record.status is TaskStatus.FAILED
    assert record.error is not None
    assert record.error.startswith("TypeError")


class Overlap:
    """A handler that counts how many of its calls overlap, at their start, exactly."""

    def __init__(self) -> None:
        self.running = self.peak = 0

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(0.3)
        finally:
            self.running -= 1
        return {"ok": True}


async def test_at_most_max_concurrency_tasks_run_at_once(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    handler = Overlap()
    ids = [await submit(f"p{i}") for i in range(9)]  # all waiting before the worker reads
    worker, running = start(settings, handler, max_concurrency=3)
    records = [await wait_final(queue, task_id) for task_id in ids]
    await stop(worker, running)
    assert {record.status for record in records} == {TaskStatus.DONE}
    assert handler.peak == 3


async def test_stop_finishes_in_flight_tasks_first(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    worker, running = start(settings, SimulatedInference(5))
    task_id = await submit(duration=0.8)
    await started(worker)
    await stop(worker, running)
    record = await queue.get(task_id)
    assert record is not None
    assert record.status is TaskStatus.DONE


async def test_tasks_past_the_grace_are_released_not_lost(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    worker, running = start(settings, hang(1.0), shutdown_grace=0.3)
    task_id = await submit()
    await started(worker)
    await stop(worker, running)
    record = await queue.get(task_id)
    assert record is not None
    assert (record.status, record.attempts) == (TaskStatus.PENDING, 0)
    finisher, running = start(settings, SimulatedInference(5))
    record = await wait_final(queue, task_id)
    await stop(finisher, running)
    assert record.status is TaskStatus.DONE


class SlowToFinish(RedisTaskQueue):
    """The real queue, but outcomes take `delay` seconds to be written: they stay buffered."""

    delay = 1.5

    async def finish(self, consumer: str, finishes: Sequence[Finish]) -> list[FinishVerdict]:
        await asyncio.sleep(self.delay)
        return await super().finish(consumer, finishes)


async def test_a_task_never_runs_again_while_its_outcome_is_buffered(
    queue: RedisTaskQueue, settings: Settings, submit: Submit, redis_client: redis.asyncio.Redis
) -> None:
    calls: list[str] = []

    async def count(prompt: str, params: Mapping[str, Any]) -> Any:
        calls.append(prompt)
        return {"ok": True}

    task_id = await submit("twice in the stream")
    # A second entry for the same task, as a submit sent twice after a timeout leaves.
    await redis_client.xadd(queue.keys.stream, {"task_id": task_id})
    worker = Worker(SlowToFinish(connect(settings), settings), count, settings)
    running = asyncio.create_task(worker.run())
    record = await wait_final(queue, task_id)
    # The second entry is only acknowledged once reclaimed (CLAIM_IDLE 2 s): it never runs.

    async def acknowledged() -> bool:
        return not (await redis_client.xpending(queue.keys.stream, queue.keys.group))["pending"]

    await poll_async(acknowledged, 15, 0.1, "the second entry was never acknowledged")
    await stop(worker, running)
    assert (record.status, record.attempts) == (TaskStatus.DONE, 1)
    assert calls == ["twice in the stream"]


class WaitTimesOutOnce(RedisTaskQueue):
    """The real queue whose first finish writes its outcomes, then fails as a durable wait
    that timed out does: the script ran, the call raised."""

    failed = False

    async def finish(self, consumer: str, finishes: Sequence[Finish]) -> list[FinishVerdict]:
        verdicts = await super().finish(consumer, finishes)
        if not self.failed:
            self.failed = True
            raise QueueBusy(QueueState.CANNOT_PERSIST, "WAITAOF confirmed no fsync in time")
        return verdicts


def finished_done() -> float:
    return (
        REGISTRY.get_sample_value("fastapi_redis_mini_tasks_finished_total", {"status": "DONE"})
        or 0.0
    )


async def test_an_outcome_written_by_a_call_that_then_failed_is_counted_once(
    queue: RedisTaskQueue, settings: Settings, submit: Submit
) -> None:
    task_id = await submit("written, then the wait timed out")
    before = finished_done()
    failing = WaitTimesOutOnce(connect(settings), settings)
    worker = Worker(failing, SimulatedInference(1), settings)
    running = asyncio.create_task(worker.run())
    record = await wait_final(queue, task_id)

    async def counted() -> bool:
        return finished_done() > before

    # The retry finds the task final, by its own write: DONE is counted, and only once.
    await poll_async(counted, 10, 0.02, "the DONE written before the failure was never counted")
    await stop(worker, running)
    assert failing.failed
    assert record.status is TaskStatus.DONE
    assert finished_done() - before == 1


class BrokenKeepAlive(RedisTaskQueue):
    """The real queue with a defect in one call: keep-alive raises what no loop expects."""

    async def keep_alive(self, consumer: str, jobs: Sequence[Job]) -> list[str]:
        raise RuntimeError("a defect in keep-alive")


async def test_a_loop_that_dies_fails_healthz_and_ends_the_worker(
    settings: Settings, submit: Submit
) -> None:
    await submit(duration=0.8)  # keep-alive has something to keep while it runs
    configured = settings.model_copy(update={"claim_idle": 0.6})
    queue = BrokenKeepAlive(connect(configured), configured)
    worker = Worker(queue, SimulatedInference(1), configured)
    app = build_app(worker, queue, configured)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        assert (await client.get("/healthz")).status_code == 200
        with pytest.raises(WorkerFailed, match="keep-alive loop ended with RuntimeError"):
            await asyncio.wait_for(worker.run(), 20)
        health = await client.get("/healthz")
    await queue.close()
    assert health.status_code == 503
    assert health.json()["status"] == "failed"


async def test_a_worker_drains_every_partition(settings: Settings) -> None:
    configured = settings.model_copy(update={"queue_partitions": 4})
    queue = RedisTaskQueue(connect(configured), configured)
    await queue.ensure_group()
    ids = []
    for n in range(40):
        task = TaskCreate(prompt=f"spread {n}")
        ids.append((await queue.submit(task, signature=request_signature(task))).task_id)
    assert {task_id.partition("-")[0] for task_id in ids} == {"0", "1", "2", "3"}
    worker, running = start(configured, SimulatedInference(5), max_concurrency=8)
    records = [await wait_final(queue, task_id) for task_id in ids]
    await stop(worker, running)
    assert {record.status for record in records} == {TaskStatus.DONE}
    stats = await queue.stats()
    assert [(p.lag, p.pending) for p in stats.partitions] == [(0, 0)] * 4
    await queue.close()


async def test_an_outcome_another_worker_now_owns_is_not_written_and_says_so(
    settings: Settings,
    queue: RedisTaskQueue,
    submit: Submit,
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def gated(prompt: str, params: Mapping[str, Any]) -> Any:
        await release.wait()
        return {"answer": prompt}

    worker, running = start(settings, gated)
    task_id = await submit("taken over")
    await started(worker)
    # As if the entry had been reclaimed by another worker while this one ran the task.
    partition = queue.partitions.of_task(task_id)
    assert partition is not None
    await queue.redis.hset(partition.task(task_id), "owner", "another-worker")
    release.set()

    async def let_go() -> bool:
        return worker.in_flight == 0

    await poll_async(let_go, 10, 0.01, "the worker kept the task")
    await stop(worker, running)
    record = await queue.get(task_id)
    assert record is not None
    assert record.status is TaskStatus.RUNNING  # the other worker's to finish
    assert "outcome not written: another worker holds the task now" in caplog.text
