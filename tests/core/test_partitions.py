"""QUEUE_PARTITIONS on a real server: where keys go, how ids route, and that reading, retries,
reclaim, dead letters and stats cover every partition. (The cluster suite runs the same queue
with its default of 16 partitions over three masters.)"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from redis.crc import key_slot

from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, is_task_id, request_signature
from fastapi_redis_mini.core.queue import (
    CancelOutcome,
    Finish,
    FinishVerdict,
    Outcome,
    StartVerdict,
    SubmitOutcome,
)
from fastapi_redis_mini.core.redis import Keys, RedisTaskQueue, connect
from fastapi_redis_mini.core.redis.keys import Partitions, partition_count
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.core.telemetry.metrics import QueueStateCollector

PARTITIONS = 4
CONSUMER = "partitioned-consumer"


@pytest.fixture
async def pqueue(settings: Settings) -> AsyncIterator[RedisTaskQueue]:
    configured = settings.model_copy(update={"queue_partitions": PARTITIONS})
    queue = RedisTaskQueue(connect(configured), configured)
    await queue.ensure_group()
    yield queue
    await queue.close()


def prompts_in(queue: RedisTaskQueue, partition: int, count: int, tag: str = "") -> list[str]:
    """`count` prompts whose submits (without an Idempotency-Key) go to `partition`."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        prompt = f"{tag}prompt-{n}"
        n += 1
        task = TaskCreate(prompt=prompt)
        if queue.partitions.of_submit(request_signature(task), "", None).index == partition:
            found.append(prompt)
    return found


async def submit(queue: RedisTaskQueue, prompt: str, key: str | None = None) -> tuple[str, str]:
    task = TaskCreate(prompt=prompt)
    done = await queue.submit(task, signature=request_signature(task), idempotency_key=key)
    return done.task_id, done.outcome.value


def test_one_partition_keeps_todays_key_names_and_task_ids() -> None:
    single = Partitions.from_settings(Settings(key_prefix="blue:"))
    assert single.all == (Keys(prefix="blue:", queue="task_stream", group="workers"),)
    task_id = single.new_task_id(single.all[0])
    assert len(task_id) == 32
    assert is_task_id(task_id)
    assert single.of_task(task_id) == single.all[0]
    # On a cluster, a single partition is the one hash tag every key had before partitions.
    assert Partitions.from_settings(Settings(queue_partitions=1), cluster=True).all[0].prefix == (
        "{task_stream}:"
    )


def test_the_default_is_one_partition_alone_and_sixteen_on_a_cluster() -> None:
    assert partition_count(Settings(), cluster=False) == 1
    assert partition_count(Settings(), cluster=True) == 16
    assert partition_count(Settings(queue_partitions=3), cluster=False) == 3
    # Quotas count per API key in one place, so with them a cluster keeps one partition.
    with_quotas = Settings(max_unfinished_per_key=5, api_keys="k")
    assert partition_count(with_quotas, cluster=True) == 1


@pytest.mark.parametrize("prefix", ["", "blue:", "a-much-longer-prefix.for-staging:"])
def test_partitions_spread_evenly_over_three_masters_whatever_the_prefix(prefix: str) -> None:
    partitions = Partitions.from_settings(Settings(key_prefix=prefix), cluster=True)
    # How `redis-cli --cluster create` splits the slots over three masters.
    masters = [range(0, 5461), range(5461, 10923), range(10923, 16384)]
    per_master = [0, 0, 0]
    for keys in partitions.all:
        slots = {key_slot(key.encode()) for key in (keys.task("x"), keys.stream, keys.cache("s"))}
        assert len(slots) == 1  # every key of a partition in one slot
        [slot] = slots
        per_master[next(i for i, r in enumerate(masters) if slot in r)] += 1
    assert sorted(per_master) == [5, 5, 6]


def test_task_ids_name_their_partition_and_nothing_else_routes() -> None:
    partitions = Partitions.from_settings(Settings(queue_partitions=PARTITIONS))
    for keys in partitions.all:
        task_id = partitions.new_task_id(keys)
        assert is_task_id(task_id)
        assert task_id.startswith(f"{keys.index}-")
        assert partitions.of_task(task_id) == keys
    plain = "0" * 32
    assert partitions.of_task(plain) is None  # an id from before partitions names none
    assert partitions.of_task(f"{PARTITIONS}-{plain}") is None
    assert partitions.of_task(f"01x-{plain}") is None


async def test_a_submit_lands_in_its_signatures_partition_with_every_key_there(
    pqueue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    for partition in range(PARTITIONS):
        [prompt] = prompts_in(pqueue, partition, 1)
        task_id, outcome = await submit(pqueue, prompt)
        assert outcome == "queued"
        keys = pqueue.partitions.all[partition]
        assert task_id.startswith(f"{partition}-")
        assert await redis_client.hget(keys.task(task_id), "status") == "PENDING"
        assert await redis_client.xlen(keys.stream) == 1
    stats = await pqueue.stats()
    assert stats.stream_length == stats.lag == PARTITIONS
    assert [p.lag for p in stats.partitions] == [1] * PARTITIONS


async def test_get_and_cancel_find_a_task_by_its_id_alone(pqueue: RedisTaskQueue) -> None:
    [prompt] = prompts_in(pqueue, 2, 1)
    task_id, _ = await submit(pqueue, prompt)
    record = await pqueue.get(task_id)
    assert record is not None
    assert record.status is TaskStatus.PENDING
    random_part = task_id.partition("-")[2]
    for other in (f"1-{random_part}", random_part, f"{PARTITIONS}-{random_part}"):
        assert await pqueue.get(other) is None
        assert await pqueue.cancel(other) is CancelOutcome.NOT_FOUND
    assert await pqueue.cancel(task_id) is CancelOutcome.CANCELLED
    cancelled = await pqueue.get(task_id)
    assert cancelled is not None
    assert cancelled.status is TaskStatus.CANCELLED


async def test_without_single_flight_an_idempotency_key_is_decided_in_one_partition(
    settings: Settings,
) -> None:
    configured = settings.model_copy(
        update={"queue_partitions": PARTITIONS, "single_flight": False}
    )
    pqueue = RedisTaskQueue(connect(configured), configured)
    try:
        await _a_key_names_one_task_whatever_the_bodies(pqueue)
    finally:
        await pqueue.close()


async def _a_key_names_one_task_whatever_the_bodies(pqueue: RedisTaskQueue) -> None:
    first, outcome = await submit(pqueue, "first body", key="order-7")
    assert outcome == "queued"
    # Other bodies with the same key: their signatures point at every partition, the key at
    # one, so each finds the key's task there, and is refused for its other body.
    for n in range(8):
        again, outcome = await submit(pqueue, f"another body {n}", key="order-7")
        assert (again, outcome) == (first, SubmitOutcome.IDEMPOTENCY_KEY_REUSED.value)
    assert await submit(pqueue, "first body", key="order-7") == (
        first,
        SubmitOutcome.DUPLICATE.value,
    )
    keyed = pqueue.partitions.of_submit("", "", "order-7")
    assert first.startswith(f"{keyed.index}-")


async def test_with_single_flight_identical_requests_meet_in_one_partition_whatever_their_keys(
    pqueue: RedisTaskQueue,
) -> None:
    # Routed by their keys, as without single-flight, these would go to several partitions.
    keys = [f"order-{n}" for n in range(40)]
    by_key = dataclasses.replace(pqueue.partitions, by_signature=False)
    assert len({by_key.of_submit("", "", key).index for key in keys}) > 1
    answers = await asyncio.gather(*(submit(pqueue, "one body", key=key) for key in keys))
    assert sorted(outcome for _, outcome in answers) == ["coalesced"] * 39 + ["queued"]
    [task_id] = {task_id for task_id, _ in answers}
    home = pqueue.partitions.of_submit(request_signature(TaskCreate(prompt="one body")), "", None)
    assert task_id.startswith(f"{home.index}-")
    # Each key names that task when sent again with its body, and a key sent again with
    # another body whose signature lands in the same partition is refused as before.
    assert await submit(pqueue, "one body", key="order-3") == (task_id, "duplicate")
    [other_body] = prompts_in(pqueue, home.index, 1, tag="other-")
    assert await submit(pqueue, other_body, key="order-3") == (
        task_id,
        SubmitOutcome.IDEMPOTENCY_KEY_REUSED.value,
    )


async def test_reads_go_round_every_partition_so_a_backlog_starves_none(
    pqueue: RedisTaskQueue,
) -> None:
    for prompt in prompts_in(pqueue, 0, 40, tag="heavy-"):
        await submit(pqueue, prompt)
    light = set()
    for partition in range(1, PARTITIONS):
        for prompt in prompts_in(pqueue, partition, 2, tag="light-"):
            light.add((await submit(pqueue, prompt))[0])
    # Reading 4 at a time, the six light tasks are all handed out within two reads, although
    # the heavy partition alone could fill ten.
    read: list[str] = []
    for _ in range(2):
        read += [d.task_id for d in await pqueue.read(CONSUMER, count=4, block_ms=100)]
    assert light <= set(read)
    assert len(read) == 8
    # Only partition 0 has work left: a read of one passes over the empty ones' turns to it.
    turns = [
        (await pqueue.read(CONSUMER, count=1, block_ms=100))[0].task_id.partition("-")[0]
        for _ in range(PARTITIONS)
    ]
    assert turns == ["0"] * PARTITIONS
    # And a backlog in one partition fills a large read without waiting on the empty ones.
    assert len(await pqueue.read(CONSUMER, count=100, block_ms=100)) == 40 - 2 - PARTITIONS


async def test_an_idle_reader_wakes_for_a_new_task_in_any_partition(
    pqueue: RedisTaskQueue,
) -> None:
    for partition in (3, 1):
        [prompt] = prompts_in(pqueue, partition, 1, tag=f"wake-{partition}-")
        reading = asyncio.create_task(pqueue.read(CONSUMER, count=10, block_ms=30_000))
        await asyncio.sleep(0.3)  # the reader found nothing and sleeps
        assert not reading.done()
        began = time.monotonic()
        task_id, _ = await submit(pqueue, prompt)
        deliveries = await asyncio.wait_for(reading, 30)
        # Woken by the announcement, long before the 30 s it would otherwise sleep.
        assert time.monotonic() - began < 10
        assert [d.task_id for d in deliveries] == [task_id]


async def test_outcomes_retries_and_reclaims_work_per_partition(
    pqueue: RedisTaskQueue, settings: Settings
) -> None:
    ids = []
    for partition in range(PARTITIONS):
        [prompt] = prompts_in(pqueue, partition, 1, tag="life-")
        ids.append((await submit(pqueue, prompt))[0])
    jobs = await pqueue.start(CONSUMER, await pqueue.read(CONSUMER, count=10, block_ms=100))
    assert sorted(j.task_id for j in jobs) == sorted(ids)
    assert all(j.verdict is StartVerdict.RUN for j in jobs)
    assert await pqueue.keep_alive(CONSUMER, jobs) == ["ok"] * PARTITIONS
    # One outcome batch over every partition: DONE for two, a due retry for the others.
    finishes = [
        Finish(j, Outcome.DONE, result=orjson.dumps(j.task_id))
        if n < 2
        else Finish(j, Outcome.RETRY, error="again", due_at=time.time() - 1)
        for n, j in enumerate(jobs)
    ]
    assert await pqueue.finish(CONSUMER, finishes) == [FinishVerdict.WRITTEN] * PARTITIONS
    for finish in finishes[:2]:
        done = await pqueue.get(finish.job.task_id)
        assert done is not None
        assert done.result == finish.job.task_id
    assert (await pqueue.stats()).retry_size == 2
    assert await pqueue.promote_due_retries(limit=100) == 2
    retried = await pqueue.read(CONSUMER, count=10, block_ms=100)
    assert sorted(d.task_id for d in retried) == sorted(f.job.task_id for f in finishes[2:])
    # The consumer dies holding them: another reclaims them once idle, from each partition.
    await asyncio.sleep(settings.claim_idle + 0.2)
    claimed = await pqueue.claim_idle("rescuer", count=10)
    assert sorted(d.task_id for d in claimed) == sorted(d.task_id for d in retried)
    stats = await pqueue.stats()
    assert (stats.lag, stats.pending, stats.retry_size) == (0, 2, 0)


async def test_dead_letters_of_every_partition_are_listed_and_replayed(
    pqueue: RedisTaskQueue, settings: Settings
) -> None:
    ids = []
    for partition in (0, 3):
        [prompt] = prompts_in(pqueue, partition, 1, tag="poison-")
        ids.append((await submit(pqueue, prompt))[0])
    deliveries = await pqueue.read(CONSUMER, count=10, block_ms=100)
    for _ in range(settings.max_deliveries + 1):
        await pqueue.start(CONSUMER, deliveries, alone=True)
    letters = await pqueue.dead_letters(100)
    assert sorted(letter.task_id for letter in letters) == sorted(ids)
    assert sorted(letter.entry_id.partition("/")[0] for letter in letters) == ["0", "3"]
    assert (await pqueue.stats()).dead_letter_length == 2
    assert await pqueue.replay_dead_letters([letter.entry_id for letter in letters]) == 2
    assert (await pqueue.stats()).dead_letter_length == 0
    for task_id in ids:
        record = await pqueue.get(task_id)
        assert record is not None
        assert record.status is TaskStatus.PENDING


async def test_the_queue_gauges_are_summed_and_each_partition_labelled(
    pqueue: RedisTaskQueue,
) -> None:
    for partition, count in ((0, 3), (2, 1)):
        for prompt in prompts_in(pqueue, partition, count, tag="gauge-"):
            await submit(pqueue, prompt)
    registry = CollectorRegistry()
    registry.register(QueueStateCollector(await pqueue.stats()))
    text = generate_latest(registry).decode()
    assert 'fastapi_redis_mini_stream_lag{group="workers",stream="task_stream"} 4.0' in text
    for partition, lag in ((0, 3), (1, 0), (2, 1), (3, 0)):
        assert (
            "fastapi_redis_mini_partition_stream_lag"
            f'{{group="workers",partition="{partition}",stream="task_stream"}} {lag}.0'
        ) in text
