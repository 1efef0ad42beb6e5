"""take(): new entries read and their tasks started in one call, as read() then start() do."""

from __future__ import annotations

import pytest
import redis.asyncio

from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import StartVerdict
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings

pytestmark = pytest.mark.single_server(reason="take() reads undeclared keys: a single server's")

CONSUMER = "taker"


async def submit(queue: RedisTaskQueue, prompt: str) -> str:
    task = TaskCreate(prompt=prompt, params={"n": len(prompt)})
    return (await queue.submit(task, signature=request_signature(task))).task_id


async def test_take_starts_what_it_reads_in_order_and_nothing_twice(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    assert queue.takes
    ids = [await submit(queue, f"take {n}") for n in range(3)]
    first = await queue.take(CONSUMER, 2)
    second = await queue.take(CONSUMER, 2)
    assert await queue.take(CONSUMER, 2) == []

    jobs = first + second
    assert [job.task_id for job in jobs] == ids
    assert {job.verdict for job in jobs} == {StartVerdict.RUN}
    assert [job.prompt for job in jobs] == [f"take {n}" for n in range(3)]
    assert [job.params for job in jobs] == [{"n": 6}, {"n": 6}, {"n": 6}]
    assert all(job.entry_id and job.attempts == 1 and job.created_at > 0 for job in jobs)
    for job in jobs:
        task = await queue.get(job.task_id)
        assert task is not None
        assert task.status is TaskStatus.RUNNING
    # Read for this consumer, as XREADGROUP would have: its entries are pending on it.
    pending = await redis_client.xpending(queue.keys.stream, queue.keys.group)
    assert pending["pending"] == 3
    assert pending["consumers"] == [{"name": CONSUMER, "pending": 3}]


async def test_take_ends_a_cancelled_task_and_acknowledges_its_entry(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    task_id = await submit(queue, "cancelled before it starts")
    await queue.cancel(task_id)
    [job] = await queue.take(CONSUMER, 10)
    assert (job.task_id, job.verdict) == (task_id, StartVerdict.SKIP)
    pending = await redis_client.xpending(queue.keys.stream, queue.keys.group)
    assert pending["pending"] == 0


async def test_take_makes_a_vanished_group_again(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.xgroup_destroy(queue.keys.stream, queue.keys.group)
    assert await queue.take(CONSUMER, 10) == []
    groups = await redis_client.xinfo_groups(queue.keys.stream)
    assert [g["name"] for g in groups] == [queue.keys.group]
    task_id = await submit(queue, "after the group came back")
    [job] = await queue.take(CONSUMER, 10)
    assert (job.task_id, job.verdict) == (task_id, StartVerdict.RUN)


@pytest.mark.parametrize(
    "update", [{"queue_partitions": 2}, {"priority_lanes": True}], ids=["partitions", "lanes"]
)
async def test_only_one_partition_without_lanes_takes(
    settings: Settings, update: dict[str, object]
) -> None:
    configured = settings.model_copy(update=update)
    queue = RedisTaskQueue(connect(configured), configured)
    try:
        assert not queue.takes
    finally:
        await queue.close()
