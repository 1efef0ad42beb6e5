"""What handlers report while they run, async, sync and batched, as Redis stores it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from fastapi_redis_mini.core.handlers import SimulatedInference, TaskContext
from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import Finish, Outcome, Report, TaskEvents
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker._handler import HandlerRunner
from fastapi_redis_mini.worker._report import TaskReports, merged
from fastapi_redis_mini.worker.runner import Worker


async def submit(queue: RedisTaskQueue, prompt: str, **params: object) -> str:
    task = TaskCreate(prompt=prompt, params=dict(params))
    return (await queue.submit(task, signature=request_signature(task))).task_id


class SyncReporter:
    """A blocking handler that reports from its pool thread: three steps of one word each."""

    def __call__(self, prompt: str, params: Mapping[str, Any], context: TaskContext) -> Any:
        for step, word in enumerate(prompt.split(), start=1):
            context.emit(word)
            context.progress(step / 3, f"step {step}")
            threading.Event().wait(0.05)  # blocks its thread, as a forward pass would
        return {"thread": threading.current_thread().name}


class BatchedReporter:
    """A batched handler that reports for each item of its batch through that item's context."""

    max_batch_size = 4
    max_batch_wait_ms = 50.0

    async def __call__(
        self,
        prompts: list[str],
        params: list[Mapping[str, Any]],
        contexts: list[TaskContext],
    ) -> list[Any]:
        for prompt, context in zip(prompts, contexts, strict=True):
            context.emit(f"<{prompt}>")
            context.progress(1.0, "batch done")
        await asyncio.sleep(0.01)
        return [len(prompts)] * len(prompts)


async def run_until_final(
    queue: RedisTaskQueue, worker: Worker, task_ids: list[str]
) -> list[TaskEvents]:
    running = asyncio.create_task(worker.run())
    try:
        reads: list[TaskEvents] = []
        for task_id in task_ids:
            task = await queue.wait(task_id, "", 10)
            assert task is not None
            assert task.status is TaskStatus.DONE
            read = await queue.read_events(task_id, "", "0-0", 100)
            assert read is not None
            reads.append(read)
        return reads
    finally:
        worker.stop()
        await running


async def test_a_sync_handler_reports_from_its_thread_and_every_report_lands_before_done(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    worker = Worker(queue, SyncReporter(), settings)
    task_id = await submit(queue, "alpha beta gamma")
    [read] = await run_until_final(queue, worker, [task_id])
    outputs = [e.text for e in read.events if e.kind == "output"]
    assert "".join(outputs) == "alphabetagamma"
    assert [e.fraction for e in read.events if e.kind == "progress"][-1] == 1.0
    assert read.task.progress == 1.0
    assert read.task.progress_message == "step 3"
    assert {e.attempt for e in read.events} == {1}


async def test_a_batched_handler_reports_for_each_item_through_its_own_context(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    worker = Worker(queue, BatchedReporter(), settings.model_copy(update={"max_concurrency": 4}))
    task_ids = [await submit(queue, f"item{n}") for n in range(3)]
    reads = await run_until_final(queue, worker, task_ids)
    for n, read in enumerate(reads):
        assert [e.text for e in read.events if e.kind == "output"] == [f"<item{n}>"]
        assert read.task.progress == 1.0


async def test_the_simulate_handler_streams_its_output_word_by_word(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    worker = Worker(queue, SimulatedInference(5), settings)
    task_id = await submit(queue, "a b c d", duration=0.4)
    [read] = await run_until_final(queue, worker, [task_id])
    assert read.task.result is not None
    assert "".join(e.text for e in read.events if e.kind == "output") == read.task.result["output"]
    progress = [e.fraction for e in read.events if e.kind == "progress"]
    assert progress == sorted(progress)
    assert progress[-1] == 1.0


async def test_a_report_is_refused_once_the_run_is_not_the_reporters(
    queue: RedisTaskQueue,
) -> None:
    task_id = await submit(queue, "mine")
    [delivery] = await queue.read("me", 10, 10)
    [job] = await queue.start("me", [delivery])
    assert await queue.report("me", task_id, [Report("output", "x")])
    assert not await queue.report("someone else", task_id, [Report("output", "y")])
    await queue.finish("me", [Finish(job, Outcome.DONE, result=b"1")])
    assert not await queue.report("me", task_id, [Report("output", "z")])  # final: too late
    read = await queue.read_events(task_id, "", "0-0", 10)
    assert read is not None
    assert [e.text for e in read.events] == ["x"]


async def test_the_event_stream_is_capped_and_expires_after_the_task(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    capped = settings.model_copy(update={"events_maxlen": 3})
    own = RedisTaskQueue(connect(capped), capped)
    try:
        task_id = await submit(own, "capped")
        [delivery] = await own.read("me", 10, 10)
        await own.start("me", [delivery])
        for n in range(5):
            assert await own.report("me", task_id, [Report("output", str(n))])
        read = await own.read_events(task_id, "", "0-0", 10)
        assert read is not None
        assert [e.text for e in read.events] == ["2", "3", "4"]  # the oldest dropped first
        ttl = await own.redis.ttl(own.keys.task_events(task_id))
        task_ttl = await own.redis.ttl(own.keys.task(task_id))
        assert task_ttl <= ttl <= task_ttl + capped.task_timeout + 1
    finally:
        await own.close()


async def test_reports_piled_up_meanwhile_go_in_one_call_with_outputs_joined() -> None:
    sent: list[list[Report]] = []
    release = asyncio.Event()

    async def send(task_id: str, reports: Sequence[Report]) -> bool:
        sent.append(list(reports))
        await release.wait()
        return True

    reports = TaskReports("t", send, asyncio.get_running_loop())
    reports.emit("a")
    await asyncio.sleep(0)  # the first send is in flight, held
    for chunk in "bcd":
        reports.emit(chunk)
    reports.progress(0.2)
    reports.progress(0.4, "later")
    release.set()
    await reports.close(1)
    assert sent == [
        [Report("output", "a")],
        [Report("output", "bcd"), Report("progress", "later", 0.4)],
    ]
    reports.emit("after close")  # dropped: the outcome is being written
    assert len(sent) == 2


def test_merging_keeps_the_order_of_kinds() -> None:
    reports = [
        Report("progress", "", 0.1), Report("output", "a"), Report("output", "b"),
        Report("progress", "", 0.2), Report("progress", "m", 0.3),
    ]  # fmt: skip
    expected = [Report("progress", "", 0.1), Report("output", "ab"), Report("progress", "m", 0.3)]
    assert merged(reports) == expected


async def test_a_bad_progress_is_the_handlers_error_and_a_process_pool_is_refused(
    settings: Settings,
) -> None:
    reports = TaskReports("t", lambda *_: asyncio.sleep(0, True), asyncio.get_running_loop())
    with pytest.raises(ValueError, match="from 0 to 1"):
        reports.progress(1.5)
    with pytest.raises(ValueError, match="HANDLER_POOL=process"):
        HandlerRunner(SyncReporter(), settings.model_copy(update={"handler_pool": "process"}))
