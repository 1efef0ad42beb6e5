"""Batching across tasks, in-process on a real Redis: one call per batch, outcomes per item."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY

from fastapi_redis_mini.core.handlers import RetryableError, SimulatedAccelerator
from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import CancelOutcome, SubmitOutcome
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker._batch import Batcher, batch_options
from fastapi_redis_mini.worker.runner import Worker
from fastapi_redis_mini_harness.polling import poll_async

from ..support.handlers import BatchModel


async def submit_all(queue: RedisTaskQueue, prompts: Sequence[str], **params: object) -> list[str]:
    tasks = [TaskCreate(prompt=p, params=dict(params)) for p in prompts]
    return [(await queue.submit(t, signature=request_signature(t))).task_id for t in tasks]


class Running:
    """A worker running in this process on its own queue client, stopped by `close()`."""

    def __init__(self, settings: Settings, handler: Any, **overrides: object) -> None:
        self.settings = settings.model_copy(update={"max_concurrency": 8, **overrides})
        self.queue = RedisTaskQueue(connect(self.settings), self.settings)
        self.worker = Worker(self.queue, handler, self.settings)
        self.task = asyncio.create_task(self.worker.run())

    async def close(self) -> None:
        self.worker.stop()
        try:
            await asyncio.wait_for(self.task, 20)
        finally:
            await self.queue.close()


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_tasks_held_together_meet_in_one_call_and_a_bad_input_fails_only_itself(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    model = BatchModel(1)
    prompts = ["one", "two", "bad three", "four", "five"]
    ids = await submit_all(queue, prompts)  # all waiting before the worker reads
    batches_before = sample("fastapi_redis_mini_handler_batch_size_count")
    running = Running(settings, model)
    records = [await queue.wait(task_id, "", 10) for task_id in ids]
    await running.close()
    assert model.batches == [prompts]
    assert sample("fastapi_redis_mini_handler_batch_size_count") - batches_before == 1
    by_prompt = {p: r for p, r in zip(prompts, records, strict=True) if r is not None}
    assert by_prompt["bad three"].status is TaskStatus.FAILED
    assert by_prompt["bad three"].error == "ValueError: cannot read 'bad three'"
    for prompt in ("one", "two", "four", "five"):
        assert by_prompt[prompt].status is TaskStatus.DONE
        assert by_prompt[prompt].result == {"upper": prompt.upper(), "batch": 5}


async def test_a_full_batch_of_waiting_tasks_is_taken_at_once_and_reaches_the_model_whole(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    class NoWait(BatchModel):
        max_batch_wait_ms = 0  # a batch goes as soon as the tasks taken so far are in it

    model = NoWait(1)
    prompts = [f"p{i}" for i in range(8)]  # a whole batch, and all of MAX_CONCURRENCY 8
    ids = await submit_all(queue, prompts)
    running = Running(settings, model)
    records = [await queue.wait(task_id, "", 10) for task_id in ids]
    await running.close()
    assert [r.status for r in records if r is not None] == [TaskStatus.DONE] * 8
    # Taken half at a time (4 and 4), as no-op tasks are, they would go as two calls.
    assert model.batches == [prompts]


async def test_the_batches_in_flight_share_max_concurrency(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    class TwoAtOnce(BatchModel):
        max_batches_in_flight = 2  # with MAX_CONCURRENCY 8, batches of at most 8 / 2

    model = TwoAtOnce(1)
    prompts = [f"p{n}" for n in range(8)]
    ids = await submit_all(queue, prompts, block=0.2)
    running = Running(settings, model)
    records = [await queue.wait(task_id, "", 10) for task_id in ids]
    await running.close()
    assert [r.status for r in records if r is not None] == [TaskStatus.DONE] * 8
    assert sorted(len(batch) for batch in model.batches) == [4, 4]


async def test_each_item_is_cached_under_its_own_signature(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    prompts = ["cache a", "cache b", "cache c"]
    ids = await submit_all(queue, prompts)
    running = Running(settings, BatchModel(1))
    records = [await queue.wait(task_id, "", 10) for task_id in ids]
    await running.close()
    again = [
        await queue.submit(TaskCreate(prompt=p), signature=request_signature(TaskCreate(prompt=p)))
        for p in prompts
    ]
    assert [r.status for r in records if r is not None] == [TaskStatus.DONE] * 3
    assert [a.outcome for a in again] == [SubmitOutcome.CACHED] * 3
    assert [a.task_id for a in again] == ids
    assert [a.result for a in again] == [{"upper": p.upper(), "batch": 3} for p in prompts]


async def test_a_retryable_item_is_retried_alone(queue: RedisTaskQueue, settings: Settings) -> None:
    class BusyOnce(BatchModel):
        def __call__(self, prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
            answers = super().__call__(prompts, params)
            if len(self.batches) == 1:
                return answers
            return [{"retried": p} for p in prompts]

    model = BusyOnce(1)
    ids = await submit_all(queue, ["fine", "busy now"])
    running = Running(settings, model, retry_backoff=0.05)
    records = [await queue.wait(task_id, "", 10) for task_id in ids]
    await running.close()
    assert model.batches == [["fine", "busy now"], ["busy now"]]
    assert [(r.status, r.attempts) for r in records if r is not None] == [
        (TaskStatus.DONE, 1),
        (TaskStatus.DONE, 2),
    ]


async def test_a_task_cancelled_mid_batch_is_cancelled_and_the_rest_finish(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    ids = await submit_all(queue, ["keep 1", "drop", "keep 2"], block=1.5)
    running = Running(settings, BatchModel(1), claim_idle=0.6)

    async def started() -> bool:
        return running.worker.in_flight == 3

    await poll_async(started, 10, 0.01, "the batch never started")
    assert await queue.cancel(ids[1]) is CancelOutcome.REQUESTED
    records = [await queue.wait(task_id, "", 10) for task_id in ids]
    await running.close()
    assert [r.status for r in records if r is not None] == [
        TaskStatus.DONE,
        TaskStatus.CANCELLED,
        TaskStatus.DONE,
    ]


async def test_a_batch_over_the_timeout_fails_its_items_on_time(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    ids = await submit_all(queue, ["slow 1", "slow 2"], block=2.0)
    running = Running(settings, BatchModel(1), task_timeout=0.5, max_task_duration=0.5)
    records = [await queue.wait(task_id, "", 1.8) for task_id in ids]
    await running.close()
    assert [(r.status, r.error) for r in records if r is not None] == [
        (TaskStatus.FAILED, "timeout after 0.5s")
    ] * 2


async def test_the_simulated_accelerator_answers_each_item_as_simulate_would(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    ids = await submit_all(queue, ["sim a", "sim b"])
    [failing] = await submit_all(queue, ["sim c"], fail=True)
    running = Running(settings, SimulatedAccelerator(1))
    records = [await queue.wait(task_id, "", 10) for task_id in [*ids, failing]]
    await running.close()
    done = [r for r in records if r is not None and r.status is TaskStatus.DONE]
    assert [r.result["model"] for r in done] == ["sim-1", "sim-1"]  # type: ignore[index]
    assert records[2] is not None
    assert records[2].error == "TaskFailedError: simulated failure requested by params.fail"


# -- the Batcher on its own


async def test_a_batch_is_sent_when_full_without_waiting() -> None:
    calls: list[list[str]] = []

    async def call(prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        calls.append(prompts)
        return prompts

    batcher = Batcher(call, size=3, wait_ms=60_000)
    results = await asyncio.wait_for(asyncio.gather(*(batcher(p, {}) for p in "abcdef")), 5)
    assert results == list("abcdef")
    assert calls == [["a", "b", "c"], ["d", "e", "f"]]


async def test_a_partial_batch_is_sent_once_max_batch_wait_ms_passes() -> None:
    calls: list[list[str]] = []

    async def call(prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        calls.append(prompts)
        return prompts

    batcher = Batcher(call, size=100, wait_ms=50)
    waited_before = sample("fastapi_redis_mini_handler_batch_wait_seconds_sum")
    first = batcher("a", {})
    await asyncio.sleep(0.01)
    assert calls == []  # still collecting
    assert list(await asyncio.wait_for(asyncio.gather(first, batcher("b", {})), 5)) == ["a", "b"]
    assert calls == [["a", "b"]]
    waited = sample("fastapi_redis_mini_handler_batch_wait_seconds_sum") - waited_before
    assert 0.04 <= waited < 1.0


async def test_items_that_arrive_while_a_batch_runs_go_together_the_moment_it_returns() -> None:
    calls: list[list[str]] = []
    release = asyncio.Event()

    async def call(prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        calls.append(prompts)
        if len(calls) == 1:
            await release.wait()  # the device is busy with the first batch
        return prompts

    batcher = Batcher(call, size=8, wait_ms=0)
    first = asyncio.ensure_future(batcher("first", {}))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(batcher(p, {})) for p in ("b", "c", "d")]
    await asyncio.sleep(0.05)  # far past wait_ms: they still wait for the batch in flight
    assert calls == [["first"]]
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert calls == [["first"], ["b", "c", "d"]]


async def test_with_two_in_flight_the_next_batch_goes_while_the_first_runs_and_a_third_waits() -> (
    None
):
    calls: list[list[str]] = []
    release = asyncio.Event()

    async def call(prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        calls.append(prompts)
        if len(calls) <= 2:
            await release.wait()  # both calls busy
        return prompts

    batcher = Batcher(call, size=2, wait_ms=0, in_flight=2)
    first = [asyncio.ensure_future(batcher(p, {})) for p in ("a", "b")]
    await asyncio.sleep(0.01)
    second = [asyncio.ensure_future(batcher(p, {})) for p in ("c",)]
    await asyncio.sleep(0.01)
    assert calls == [["a", "b"], ["c"]]  # sent after its wait, beside the first
    third = [asyncio.ensure_future(batcher(p, {})) for p in ("d", "e", "f")]
    await asyncio.sleep(0.05)
    assert calls == [["a", "b"], ["c"]]  # two in flight: the rest wait
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*first, *second, *third), 5)
    assert results == list("abcdef")
    assert sorted(calls[2:]) == [["d", "e"], ["f"]]


async def test_a_backlog_of_two_batches_goes_at_once_with_two_in_flight() -> None:
    calls: list[list[str]] = []
    release = asyncio.Event()

    async def call(prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        calls.append(prompts)
        await release.wait()
        return prompts

    batcher = Batcher(call, size=2, wait_ms=60_000, in_flight=2)
    items = [asyncio.ensure_future(batcher(p, {})) for p in "abcd"]
    await asyncio.sleep(0.01)
    assert calls == [["a", "b"], ["c", "d"]]
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*items), 5) == list("abcd")


async def test_an_item_that_stopped_waiting_is_left_out_of_its_batch() -> None:
    calls: list[list[str]] = []

    async def call(prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        calls.append(prompts)
        return prompts

    batcher = Batcher(call, size=10, wait_ms=30)
    kept = asyncio.ensure_future(batcher("kept", {}))
    dropped = asyncio.ensure_future(batcher("dropped", {}))
    await asyncio.sleep(0)
    dropped.cancel()
    assert await asyncio.wait_for(kept, 5) == "kept"
    assert calls == [["kept"]]


async def test_a_batch_call_that_raises_fails_every_item_and_a_short_answer_too() -> None:
    async def raises(prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        raise RetryableError("device lost")

    async def short(prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        return prompts[:1]

    for call, error in ((raises, "device lost"), (short, "2 items returned 1 results")):
        batcher = Batcher(call, size=2, wait_ms=10)
        outcomes = await asyncio.gather(batcher("a", {}), batcher("b", {}), return_exceptions=True)
        assert [error in str(o) for o in outcomes] == [True, True]


@pytest.mark.parametrize(
    ("size", "wait", "in_flight", "named"),
    [
        (0, 5, 1, "max_batch_size"),
        ("8", 5, 1, "max_batch_size"),
        (8, -1, 1, "max_batch_wait_ms"),
        (8, 5, 0, "max_batches_in_flight"),
        (8, 5, True, "max_batches_in_flight"),
    ],
)
def test_bad_batch_options_are_refused_naming_the_attribute(
    size: object, wait: object, in_flight: object, named: str
) -> None:
    class Handler:
        max_batch_size = size
        max_batch_wait_ms = wait
        max_batches_in_flight = in_flight

    with pytest.raises(ValueError, match=named):
        batch_options(Handler(), "mine:Handler")
    assert batch_options(object(), "plain") is None
