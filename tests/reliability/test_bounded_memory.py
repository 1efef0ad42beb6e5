"""100k tasks through the queue leave a short stream behind, and every key they made expires.

The queue is driven in-process, in batches, the way the api submits and a worker reads, starts
and finishes; this keeps 100k tasks inside a minute on two cores.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.queue import Finish, Outcome
from fastapi_redis_mini.core.redis import RedisTaskQueue
from fastapi_redis_mini.core.settings import Settings

TASKS = 100_000
SUBMIT_BATCH = 200
TRIM_EVERY = 5_000
# XTRIM MINID ~ drops whole macro nodes only (stream-node-max-entries, 100 by default), so
# up to one node of finished entries may stay, next to whatever is still pending.
STREAM_BOUND = 200


async def submit(queue: RedisTaskQueue, first: int, count: int) -> list[TaskCreate]:
    tasks = [TaskCreate(prompt=f"task {i}") for i in range(first, first + count)]
    for start in range(0, count, SUBMIT_BATCH):
        batch = tasks[start : start + SUBMIT_BATCH]
        await asyncio.gather(
            *(queue.submit(task, signature=request_signature(task)) for task in batch)
        )
    return tasks


async def run_all(queue: RedisTaskQueue) -> int:
    """Read, start and finish everything in the stream, as a worker does, 1000 at a time."""
    finished = 0
    for _ in range(1000):
        deliveries = await queue.read("w", count=1000, block_ms=10)
        if not deliveries:
            return finished
        jobs = await queue.start("w", deliveries)
        done = [Finish(job, Outcome.DONE, result=b'{"output": "ok"}') for job in jobs]
        finished += len(await queue.finish("w", done))
    raise AssertionError("the stream never ran dry")


async def test_100k_tasks_leave_the_stream_short_and_their_keys_expiring(
    queue: RedisTaskQueue, settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    started = time.monotonic()
    longest_after_trim = longest_before_trim = finished = 0
    for first in range(0, TASKS, TRIM_EVERY):
        last = await submit(queue, first, TRIM_EVERY)
        finished += await run_all(queue)
        longest_before_trim = max(longest_before_trim, await redis_client.xlen(queue.keys.stream))
        await queue.trim()
        longest_after_trim = max(longest_after_trim, await redis_client.xlen(queue.keys.stream))
    stats = await queue.stats()
    elapsed = time.monotonic() - started

    keyspace = (await redis_client.info("keyspace"))["db0"]
    cache_ttls = [await redis_client.ttl(queue.keys.cache(request_signature(t))) for t in last]
    task_ids = [
        key async for key in redis_client.scan_iter(match="task:*", count=1000, _type="hash")
    ]
    task_ttls = [await redis_client.ttl(key) for key in task_ids[:1000]]
    print(
        f"\nreliability[100k]: tasks={TASKS} finished={finished} seconds={elapsed:.1f} "
        f"stream_before_trim_max={longest_before_trim} stream_after_trim_max={longest_after_trim} "
        f"final_stream={stats.stream_length} lag={stats.lag} pending={stats.pending} "
        f"keys={keyspace['keys']} expiring={keyspace['expires']}"
    )
    assert finished == TASKS
    assert (stats.lag, stats.pending) == (0, 0)
    assert longest_after_trim <= STREAM_BOUND
    # Lag stays defined after trimming: Redis still reports a number for the group.
    groups = await redis_client.xinfo_groups(queue.keys.stream)
    assert groups[0]["lag"] == 0
    # Every task hash, cached result, single-flight key (SINGLE_FLIGHT is on by default) and
    # ten-second count bucket (at most 90: 15 minutes of them) expires. What does not is the
    # stream and the console's two lists this run fills, queued and done, each capped at a
    # tenth over RECENT_TASKS.
    count_buckets = keyspace["expires"] - 3 * TASKS
    assert 1 <= count_buckets <= 90
    assert keyspace["keys"] - keyspace["expires"] == 3
    for capped in (queue.keys.recent, queue.keys.finished("done")):
        assert await redis_client.llen(capped) <= settings.recent_tasks * 1.1
    assert all(0 < ttl <= settings.cache_ttl for ttl in cache_ttls)
    assert all(0 < ttl <= settings.result_expiry for ttl in task_ttls)


async def test_one_trim_removes_every_finished_entry_however_many(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    # A worker trims every 10 s; if one trim removes at most 10,000 entries (XTRIM's default
    # LIMIT for "~"), a stream fed faster than 1,000 tasks a second per worker never shrinks.
    count = 15_000
    await submit(queue, 0, count)
    assert await run_all(queue) == count
    removed = await queue.trim()
    left = await redis_client.xlen(queue.keys.stream)
    print(f"\nreliability[trim-once]: finished={count} removed={removed} left={left}")
    assert left <= STREAM_BOUND
