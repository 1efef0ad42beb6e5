"""What each hot path costs Redis, counted on a real server: a guard that needs no clock.

Throughput depends on the machine; the commands a submit, a read or a finished task sends
and runs do not. MONITOR counts both the calls a client sends (round trips, pipelined or
not) and the commands a script runs inside one. Each budget is the exact count today: a
change that raises one fails here, and a change that lowers one updates it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import orjson
import pytest

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.queue import Finish, FinishVerdict, Outcome
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings

from ..support.monitor import monitored, split_by_caller

pytestmark = pytest.mark.single_server(reason="MONITOR watches the commands of one server")

CONSUMER = "budget"
BATCH = 50  # tasks a worker reads, starts and finishes together: its read batch is 100

# (calls sent, commands run in all) for one operation, or for a batch of BATCH tasks.
# EVALSHA: EXISTS, GET (cache), SET (single-flight's inflight key, SET NX GET), HSET, XADD,
# EXPIRE, LPUSH (the recent-task index)
SUBMIT_MISS = (1, 8)
SUBMIT_HIT = (1, 5)  # EVALSHA: EXISTS, GET (cache), TIME, EXPIRE (cache)
READ = (1, 2)  # EVALSHA: HMGET
# read: XREADGROUP (one partition); start: EVALSHA + (HMGET, HSET) a task + PUBLISH (the
# tasks started, for event streams); finish: EVALSHA + (HMGET, HSET, SET, EXPIRE) a task +
# TIME, XACK, PUBLISH, and for the console's index and counts LPUSH (done list), HINCRBY and
# EXPIRE (the ten-second bucket).
FINISH_BATCH = (3, 1 + 3 + 6 * BATCH + 3 + 3)
# A worker on one partition takes its batches: the XREADGROUP runs inside start.lua's call.
TAKE_BATCH = (2, FINISH_BATCH[1])


class Counted:
    """What MONITOR saw during one operation: the calls sent and every command run."""

    def __init__(self, lines: list[bytes]) -> None:
        sent, scripted = split_by_caller(lines)
        self.sent = len(sent)
        self.commands = len(sent) + len(scripted)
        self.names = Counter(args[0].upper().decode() for args in sent + scripted)

    @property
    def figures(self) -> tuple[int, int]:
        return self.sent, self.commands


async def count(settings: Settings, operation: Callable[[], Awaitable[object]]) -> Counted:
    with monitored(settings.redis_url) as lines:
        await operation()
    return Counted(lines)


def create(prompt: str) -> tuple[TaskCreate, str]:
    task = TaskCreate(prompt=prompt)
    return task, request_signature(task)


def report(name: str, counted: Counted, per: int = 1) -> None:
    sent, commands = counted.figures
    print(
        f"\nredis-budget[{name}]: calls={sent / per:.2f} commands={commands / per:.2f} "
        f"per task ({dict(sorted(counted.names.items()))})"
    )


async def warm_up(queue: RedisTaskQueue, prompt: str) -> tuple[str, TaskCreate, str]:
    """Run one task through every call, so connections are open and scripts loaded (a first
    call costs a handshake and a SCRIPT LOAD); returns the DONE task's id and its request."""
    task, signature = create(prompt)
    task_id = (await queue.submit(task, signature=signature)).task_id
    [delivery] = await queue.read(CONSUMER, count=10, block_ms=10)
    [job] = await queue.start(CONSUMER, [delivery])
    await queue.finish(CONSUMER, [Finish(job, Outcome.DONE, result=orjson.dumps("r"))])
    assert await queue.get(task_id) is not None
    await queue.submit(task, signature=signature)
    return task_id, task, signature


async def test_a_submit_a_cache_hit_and_a_read_each_cost_one_call(queue: RedisTaskQueue) -> None:
    settings = queue.settings
    task_id, done, done_signature = await warm_up(queue, "to read")
    task, signature = create("budget")
    missed = await count(settings, lambda: queue.submit(task, signature=signature))
    report("submit miss", missed)
    hit = await count(settings, lambda: queue.submit(done, signature=done_signature))
    report("submit hit", hit)
    read = await count(settings, lambda: queue.get(task_id))
    report("read", read)
    assert missed.figures == SUBMIT_MISS, missed.names
    assert hit.figures == SUBMIT_HIT, hit.names
    assert read.figures == READ, read.names


@pytest.mark.parametrize("taken", [False, True], ids=["read then started", "taken"])
async def test_a_finished_task_costs_six_commands_and_a_batch_three_calls_or_two_taken(
    settings: Settings, taken: bool
) -> None:
    configured = settings.model_copy(update={"queue_partitions": 1})
    queue = RedisTaskQueue(connect(configured), configured)
    try:
        await queue.ensure_group()
        await warm_up(queue, "warm")
        for n in range(BATCH):
            task, signature = create(f"task {n}")
            await queue.submit(task, signature=signature)

        async def run_a_batch() -> None:
            if taken:
                jobs = await queue.take(CONSUMER, 100)
            else:
                deliveries = await queue.read(CONSUMER, count=100, block_ms=10)
                jobs = await queue.start(CONSUMER, deliveries)
            finishes = [Finish(j, Outcome.DONE, result=orjson.dumps(n)) for n, j in enumerate(jobs)]
            verdicts = await queue.finish(CONSUMER, finishes)
            assert verdicts == [FinishVerdict.WRITTEN] * BATCH

        worked = await count(configured, run_a_batch)
    finally:
        await queue.close()
    report("finished task, taken" if taken else "finished task", worked, per=BATCH)
    assert worked.figures == (TAKE_BATCH if taken else FINISH_BATCH), worked.names
