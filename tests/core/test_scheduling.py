"""Scheduling in the queue, on a real Redis (and on the cluster backend): single-flight,
priority lanes and their starvation guard, fair turns between API keys, delayed starts and
deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import StartVerdict, SubmitOutcome
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings

CONSUMER = "scheduling"
Open = Callable[..., Any]


@asynccontextmanager
async def opened(settings: Settings, **changes: Any) -> AsyncIterator[RedisTaskQueue]:
    queue = RedisTaskQueue(connect(settings), settings.model_copy(update=changes))
    await queue.ensure_group()
    try:
        yield queue
    finally:
        await queue.close()


async def submit(
    queue: RedisTaskQueue, prompt: str, scope: str = "", due_at: float = 0.0, **fields: Any
) -> str:
    task = TaskCreate(prompt=prompt, **fields)
    submitted = await queue.submit(task, signature=request_signature(task), scope=scope,
                                   due_at=due_at)  # fmt: skip
    assert submitted.outcome is SubmitOutcome.QUEUED
    return submitted.task_id


async def taken(queue: RedisTaskQueue, count: int) -> list[str]:
    """The prompts of the next `count` tasks a worker is handed, in order."""
    deliveries = await queue.read(CONSUMER, count, block_ms=10)
    jobs = await queue.start(CONSUMER, deliveries)
    return [job.prompt for job in jobs if job.verdict is StartVerdict.RUN]


async def test_identical_concurrent_submits_make_one_task(settings: Settings) -> None:
    async with opened(settings) as queue:
        task = TaskCreate(prompt="a thundering herd", params={"n": 1})
        answers = await asyncio.gather(
            *(queue.submit(task, signature=request_signature(task), scope="a") for _ in range(20))
        )
        outcomes = sorted(answer.outcome for answer in answers)
        assert outcomes == [SubmitOutcome.COALESCED] * 19 + [SubmitOutcome.QUEUED]
        assert len({answer.task_id for answer in answers}) == 1
        # Another tenant's identical request is its own: single-flight is scoped like the cache.
        other = await queue.submit(task, signature=request_signature(task), scope="b")
        assert other.outcome is SubmitOutcome.QUEUED
        assert other.task_id != answers[0].task_id
        assert len(await taken(queue, 10)) == 2


async def test_single_flight_switched_off_makes_a_task_per_submit(settings: Settings) -> None:
    async with opened(settings, single_flight=False) as queue:
        task = TaskCreate(prompt="twice")
        answers = [await queue.submit(task, signature=request_signature(task)) for _ in range(2)]
        assert [a.outcome for a in answers] == [SubmitOutcome.QUEUED] * 2
        assert answers[0].task_id != answers[1].task_id


async def test_scheduling_fields_are_not_part_of_the_signature() -> None:
    plain = TaskCreate(prompt="p", params={"x": 1})
    scheduled = TaskCreate(prompt="p", params={"x": 1}, priority="high", deadline_seconds=5)
    assert request_signature(plain) == request_signature(scheduled)
    # What a previous version computed for the same body: sha256 of {"params":..,"prompt":..}.
    assert plain.canonical == b'{"params":{"x":1},"prompt":"p"}'


async def test_lanes_hand_out_high_then_normal_then_low(settings: Settings) -> None:
    async with opened(settings, priority_lanes=True) as queue:
        for priority in ("low", "normal", "high", "low", "high"):
            await submit(queue, f"{priority}-{time.monotonic_ns()}", priority=priority)
        order = [prompt.split("-")[0] for prompt in await taken(queue, 5)]
        assert order == ["high", "high", "normal", "low", "low"]


async def test_the_starvation_guard_moves_low_under_a_steady_high_load(
    settings: Settings,
) -> None:
    async with opened(settings, priority_lanes=True, priority_starvation_guard=5) as queue:
        for i in range(3):
            await submit(queue, f"low {i}", priority="low")
        handed: list[str] = []
        for i in range(20):
            # High keeps arriving faster than one worker slot takes it.
            await submit(queue, f"high {i}a", priority="high")
            await submit(queue, f"high {i}b", priority="high")
            handed += await taken(queue, 1)
        lows = [i for i, prompt in enumerate(handed) if prompt.startswith("low")]
        # Every 5th task taken may go to a lower lane with work: turns 5, 10 and 15.
        assert lows == [4, 9, 14]


async def test_without_lanes_low_waits_its_turn_in_submit_order(settings: Settings) -> None:
    async with opened(settings) as queue:
        for priority in ("low", "high"):
            await submit(queue, priority, priority=priority)
        assert await taken(queue, 2) == ["low", "high"]


@pytest.mark.parametrize("fair_share", [True, False])
async def test_a_key_with_a_backlog_does_not_delay_another_key(
    settings: Settings, fair_share: bool
) -> None:
    async with opened(settings, priority_lanes=True, fair_share=fair_share) as queue:
        for i in range(500):
            await submit(queue, f"a {i}", scope="key-a")
        assert len(await taken(queue, 20)) == 20
        await submit(queue, "b 0", scope="key-b")
        position = None
        for batch in range(100):
            prompts = await taken(queue, 5)
            if "b 0" in prompts:
                position = batch * 5 + prompts.index("b 0")
                break
        print(f"\nkey B's task went after {position} of key A's (fair_share={fair_share})")
        if fair_share:
            assert position is not None
            assert position <= 1
        else:
            assert position == 480


async def test_a_delayed_task_waits_until_it_is_due_and_can_be_cancelled(
    settings: Settings,
) -> None:
    async with opened(settings) as queue:
        due = time.time() + 0.5
        delayed = await submit(queue, "later", due_at=due)
        cancelled = await submit(queue, "never", due_at=due)
        read = await queue.get(delayed)
        assert read is not None
        assert read.status is TaskStatus.PENDING
        assert read.run_at == due
        assert await queue.promote_due_retries(10) == 0
        assert await taken(queue, 10) == []
        await queue.cancel(cancelled)
        await asyncio.sleep(due - time.time() + 0.05)
        assert await queue.promote_due_retries(10) == 1
        assert await taken(queue, 10) == ["later"]


async def test_a_task_past_its_deadline_expires_and_never_starts(settings: Settings) -> None:
    async with opened(settings, priority_lanes=True) as queue:
        task_id = await submit(queue, "too late", deadline_seconds=0.2)
        kept = await submit(queue, "in time", deadline_seconds=60)
        read = await queue.get(task_id)
        assert read is not None
        assert read.status is TaskStatus.PENDING
        await asyncio.sleep(0.3)
        read = await queue.get(task_id)
        assert read is not None
        assert read.status is TaskStatus.EXPIRED
        deliveries = await queue.read(CONSUMER, 10, block_ms=10)
        jobs = {job.task_id: job.verdict for job in await queue.start(CONSUMER, deliveries)}
        assert jobs == {task_id: StartVerdict.EXPIRED, kept: StartVerdict.RUN}
        stored = await queue.get(task_id)
        assert stored is not None
        assert stored.status is TaskStatus.EXPIRED
        assert stored.error == "not started by its deadline"
        assert stored.started_at is None


async def test_lane_depth_and_age_are_in_the_stats(settings: Settings) -> None:
    async with opened(settings, priority_lanes=True) as queue:
        await submit(queue, "h", priority="high")
        await submit(queue, "l1", priority="low")
        await submit(queue, "l2", priority="low")
        await asyncio.sleep(0.2)
        stats = await queue.stats()
        depths = {lane.priority: lane.depth for lane in stats.lanes}
        assert depths == {"high": 1, "normal": 0, "low": 2}
        ages = {lane.priority: lane.oldest_age for lane in stats.lanes}
        assert ages["normal"] == 0
        assert 0.1 < ages["low"] < 10
        assert stats.backlog == 3


async def test_fair_turns_hold_in_every_partition(settings: Settings) -> None:
    # With several partitions each orders its own lanes, and a worker reads them in turn.
    async with opened(settings, priority_lanes=True, queue_partitions=4) as queue:
        for i in range(200):
            await submit(queue, f"a {i}", scope="key-a")
        assert len(await taken(queue, 8)) == 8
        await submit(queue, "b 0", scope="key-b")
        handed: list[str] = []
        while "b 0" not in handed and len(handed) < 200:
            handed += await taken(queue, 4)
        print(f"\nkey B's task was handed out after {handed.index('b 0')} of key A's")
        # At most one turn in each of the four partitions goes first.
        assert handed.index("b 0") <= 4


async def test_tasks_queued_before_lanes_were_on_are_handed_out_first(
    settings: Settings,
) -> None:
    # One partition for both: on a cluster, lanes change the default partition count, which
    # moves every key (docs/scheduling.md).
    async with opened(settings, queue_partitions=1) as before:
        await submit(before, "queued by the previous version")
    async with opened(settings, priority_lanes=True, queue_partitions=1) as queue:
        await submit(queue, "in a lane", priority="high")
        assert await taken(queue, 1) == ["queued by the previous version"]
        assert await taken(queue, 1) == ["in a lane"]


async def test_a_task_handed_out_from_a_lane_is_reclaimed_when_its_worker_dies(
    settings: Settings,
) -> None:
    async with opened(settings, priority_lanes=True, claim_idle=0.2) as queue:
        task_id = await submit(queue, "orphaned", priority="low")
        [delivery] = await queue.read("dies", 1, block_ms=10)
        assert delivery.task_id == task_id
        await asyncio.sleep(0.3)
        [claimed] = await queue.claim_idle("survivor", 10)
        assert claimed.task_id == task_id


async def test_a_lanes_oldest_age_is_its_oldest_task_whichever_leaves_next(
    settings: Settings,
) -> None:
    async with opened(settings, priority_lanes=True, queue_partitions=1) as queue:
        # Key B queues two tasks (turns 1 and 2); later key A queues one, which gets turn 1 as
        # well, since B's backlog must not delay it. Once B's first is taken, A's task (the
        # youngest) leaves next, and B's second (the oldest) waits behind it.
        await submit(queue, "b 1", scope="key-b")
        await submit(queue, "b 2", scope="key-b")
        await asyncio.sleep(0.5)
        await submit(queue, "a 1", scope="key-a")
        assert await taken(queue, 1) == ["b 1"]
        [lane] = [lane for lane in (await queue.stats()).lanes if lane.priority == "normal"]
        assert lane.depth == 2
        assert 0.5 <= lane.oldest_age < 30
        assert await taken(queue, 2) == ["a 1", "b 2"]
        [lane] = [lane for lane in (await queue.stats()).lanes if lane.priority == "normal"]
        assert (lane.depth, lane.oldest_age) == (0, 0)


async def turn_fields(queue: RedisTaskQueue, client: Any) -> dict[str, str]:
    """The per-key fields of the partition's lane-turns hash: {"key:LANE:SCOPE": turn}."""
    fields: dict[str, str] = await client.hgetall(queue.keys.lane_turns)
    return {name: turn for name, turn in fields.items() if name.startswith("key:")}


async def test_the_turns_of_keys_with_nothing_waiting_are_dropped(
    settings: Settings, redis_client: Any
) -> None:
    async with opened(settings, priority_lanes=True, queue_partitions=1) as queue:
        await asyncio.gather(*(submit(queue, f"once {n}", scope=f"once-{n}") for n in range(30)))
        assert len(await turn_fields(queue, redis_client)) == 30
        assert len(await taken(queue, 30)) == 30
        for i in range(40):
            await submit(queue, f"a {i}", scope="key-a")
        assert len(await taken(queue, 5)) == 5
        await queue.trim()
        # The thirty keys whose one task was taken are gone; key A, with tasks still waiting,
        # keeps its place (turns 2 to 41, after the others' turn 1).
        assert await turn_fields(queue, redis_client) == {"key:2:key-a": "41"}
        # A key that comes back after its field went starts one past the lane's last turn,
        # exactly as it would have with the field kept, and takes turns with A as a new key.
        await submit(queue, "b 0", scope="key-b")
        await submit(queue, "b 1", scope="key-b")
        await submit(queue, "once 0 again", scope="once-0")
        handed = [prompt.split()[0] for prompt in await taken(queue, 6)]
        # Turn by turn: A, B and the returning key share the next turn (in the order queued,
        # to the millisecond), then A and B, then A alone.
        assert [sorted(handed[:3]), sorted(handed[3:5]), handed[5:]] == [
            ["a", "b", "once"], ["a", "b"], ["a"],
        ]  # fmt: skip
        await queue.trim()
        assert await turn_fields(queue, redis_client) == {"key:2:key-a": "41"}
        while await taken(queue, 10):
            pass
        await queue.trim()
        assert await turn_fields(queue, redis_client) == {}


async def test_dropping_turns_sweeps_a_large_hash_a_bounded_part_at_a_time(
    settings: Settings, redis_client: Any
) -> None:
    async with opened(settings, priority_lanes=True, queue_partitions=1) as queue:
        keys = 1500
        await asyncio.gather(*(submit(queue, f"t {n}", scope=f"k-{n}") for n in range(keys)))
        assert len(await turn_fields(queue, redis_client)) == keys
        while await taken(queue, 500):
            pass
        await queue.trim()
        # One call looks at about a thousand fields, and leaves its cursor for the next.
        left = len(await turn_fields(queue, redis_client))
        assert 0 < left < keys
        await queue.trim()
        assert await turn_fields(queue, redis_client) == {}
        assert await redis_client.hexists(queue.keys.lane_turns, "trim-cursor") == 0


async def test_identical_requests_with_different_idempotency_keys_make_one_task(
    settings: Settings,
) -> None:
    # Sixteen partitions, a cluster's default: routed by their keys, these twenty submits
    # would land in several partitions and never meet.
    async with opened(settings, queue_partitions=16) as queue:
        task = TaskCreate(prompt="one request, many keys")
        answers = await asyncio.gather(
            *(
                queue.submit(task, signature=request_signature(task), scope="a",
                             idempotency_key=f"key-{n}")
                for n in range(20)
            )
        )  # fmt: skip
        outcomes = sorted(answer.outcome for answer in answers)
        assert outcomes == [SubmitOutcome.COALESCED] * 19 + [SubmitOutcome.QUEUED]
        assert len({answer.task_id for answer in answers}) == 1
        assert len(await taken(queue, 10)) == 1
