"""The Redis Streams queue against a real server: the data model and every transition."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import redis.asyncio

from fastapi_redis_mini.core.models import (
    Priority,
    Task,
    TaskCreate,
    TaskStatus,
    request_signature,
)
from fastapi_redis_mini.core.queue import (
    CancelOutcome,
    Delivery,
    Finish,
    FinishVerdict,
    Job,
    Outcome,
    StartVerdict,
    SubmitOutcome,
)
from fastapi_redis_mini.core.redis.keys import Keys
from fastapi_redis_mini.core.redis.queue import RedisTaskQueue, _NewTask, connect
from fastapi_redis_mini.core.settings import Settings

CONSUMER = "test-consumer"


async def submit(queue: RedisTaskQueue, prompt: str = "hello", **params: object) -> str:
    task = TaskCreate(prompt=prompt, params=dict(params))
    submitted = await queue.submit(task, signature=request_signature(task))
    return submitted.task_id


async def take(queue: RedisTaskQueue, consumer: str = CONSUMER) -> list[Job]:
    deliveries = await queue.read(consumer, count=100, block_ms=100)
    return await queue.start(consumer, deliveries)


def done(job: Job, result: object) -> Finish:
    return Finish(job, Outcome.DONE, result=orjson.dumps(result))


# Key names come from the queue, so the tests hold on one server (today's names) and on a
# cluster (hash-tagged, QUEUE_PARTITIONS partitions) alike.
def keys_of(queue: RedisTaskQueue, task_id: str) -> Keys:
    keys = queue.partitions.of_task(task_id)
    assert keys is not None, f"{task_id} names no partition"
    return keys


def idempotency_key(queue: RedisTaskQueue, key: str, signature: str) -> str:
    return queue.partitions.of_submit(signature, "", key).idempotency(key)


def fresh_task_id(queue: RedisTaskQueue) -> str:
    """A task id of the queue's first partition, as a submit there would make it."""
    return queue.partitions.new_task_id(queue.keys)


async def stream_entries(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis | redis.asyncio.RedisCluster
) -> list[tuple[str, dict[str, str]]]:
    """Every partition's stream entries, partition by partition."""
    entries: list[tuple[str, dict[str, str]]] = []
    for keys in queue.partitions.all:
        entries += await redis_client.xrange(keys.stream)  # type: ignore[arg-type]
    return entries


async def key_count(redis_client: redis.asyncio.Redis) -> int:
    """How many keys the server holds: on a cluster, summed over its masters."""
    client: object = redis_client
    if isinstance(client, redis.asyncio.RedisCluster):
        total: int = await client.dbsize(target_nodes=redis.asyncio.RedisCluster.PRIMARIES)
        return total
    return await redis_client.dbsize()


def one_partition(settings: Settings, **update: object) -> Settings:
    """Settings with a single partition: the default on one server, and on a cluster the
    layout of tests that follow one stream's order or one partition's channel."""
    return settings.model_copy(update={"queue_partitions": 1, **update})


async def test_submit_writes_the_task_hash_and_appends_only_the_id(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    task_id = await submit(queue, duration=0.1)
    keys = keys_of(queue, task_id)
    stored = await redis_client.hgetall(keys.task(task_id))
    assert stored["status"] == "PENDING"
    assert orjson.loads(stored["request"]) == {"prompt": "hello", "params": {"duration": 0.1}}
    assert len(stored["signature"]) == 64
    assert float(stored["created_at"]) == pytest.approx(time.time(), abs=5)
    assert 0 < await redis_client.ttl(keys.task(task_id)) <= 86400
    entries = await stream_entries(queue, redis_client)
    assert [fields for _, fields in entries] == [{"task_id": task_id}]


async def test_task_ids_are_random_128_bit_hex(queue: RedisTaskQueue) -> None:
    ids = {await submit(queue, prompt=f"p{i}") for i in range(20)}
    assert len(ids) == 20
    # With several partitions an id is `<partition>-<random hex>`.
    assert all(keys_of(queue, task_id) for task_id in ids)
    randoms = [task_id.rpartition("-")[2] for task_id in ids]
    assert all(len(random) == 32 and int(random, 16) >= 0 for random in randoms)


async def test_a_run_goes_pending_running_done_and_fills_the_cache(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    task_id = await submit(queue)
    [job] = await take(queue)
    assert job.verdict is StartVerdict.RUN
    assert (job.task_id, job.prompt, job.attempts) == (task_id, "hello", 1)
    running = await queue.get(task_id)
    assert running is not None
    assert running.status is TaskStatus.RUNNING
    assert running.started_at is not None
    assert await queue.finish(CONSUMER, [done(job, {"answer": 42})]) == [FinishVerdict.WRITTEN]
    record = await queue.get(task_id)
    assert record is not None
    assert (record.status, record.result) == (TaskStatus.DONE, {"answer": 42})
    assert record.finished_at is not None
    assert record.finished_at >= record.started_at  # type: ignore[operator]
    # The cached result names the task that computed it and when that task expires.
    keys = keys_of(queue, task_id)
    cached: str = await redis_client.get(keys.cache(job.signature))  # type: ignore[assignment]
    task_ttl = await redis_client.ttl(keys.task(task_id))
    named, expires_at, result = cached.split(":", 2)
    assert (named, result) == (task_id, '{"answer":42}')
    assert int(expires_at) == pytest.approx(time.time() + task_ttl, abs=2)
    assert 0 < await redis_client.ttl(keys.cache(job.signature)) <= task_ttl
    assert 0 < await redis_client.ttl(keys.cache(job.signature)) <= 600
    assert (await queue.stats()).pending == 0


async def test_an_identical_submit_is_answered_from_the_cache(queue: RedisTaskQueue) -> None:
    task_id = await submit(queue)
    [job] = await take(queue)
    await queue.finish(CONSUMER, [done(job, "result")])
    task = TaskCreate(prompt="hello", params={})
    again = await queue.submit(task, signature=request_signature(task))
    assert again.outcome is SubmitOutcome.CACHED
    assert again.result == "result"
    # The answer names the task that computed the result, and stores nothing new.
    assert again.task_id == task_id
    record = await queue.get(again.task_id)
    assert record is not None
    assert (record.status, record.result) == (TaskStatus.DONE, "result")
    assert (await queue.stats()).stream_length == 1


async def test_cache_hits_store_nothing_however_many(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    # One partition: with several, a submit with an Idempotency-Key is decided in the key's
    # partition, where the cache of its signature need not be.
    queue = RedisTaskQueue(connect(one_partition(settings)), one_partition(settings))
    await queue.ensure_group()
    try:
        await _check_cache_hits_store_nothing(queue, redis_client)
    finally:
        await queue.close()


async def _check_cache_hits_store_nothing(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    task_id = await submit(queue)
    [job] = await take(queue)
    await queue.finish(CONSUMER, [done(job, "result")])
    before = await key_count(redis_client)
    task = TaskCreate(prompt="hello", params={})
    hits = await asyncio.gather(
        *(
            queue.submit(task, signature=request_signature(task), idempotency_key=key)
            for key in (None, None, None, "k1", "k2")
        )
    )
    assert {hit.outcome for hit in hits} == {SubmitOutcome.CACHED}
    assert {hit.task_id for hit in hits} == {task_id}
    # Only the two Idempotency-Keys are new, and neither they nor the cache outlive the task
    # they name, to the millisecond.
    assert await key_count(redis_client) == before + 2
    task_ends = await redis_client.pexpiretime(keys_of(queue, task_id).task(task_id))
    k1 = idempotency_key(queue, "k1", request_signature(task))
    cache = keys_of(queue, task_id).cache(request_signature(task))
    for key in (k1, cache):
        assert time.time() * 1000 < await redis_client.pexpiretime(key) <= task_ends, key


async def test_a_cached_result_never_outlives_the_task_it_names(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    short = settings.model_copy(update={"result_expiry": 2, "cache_ttl": 600})
    queue = RedisTaskQueue(connect(short), short)
    try:
        await queue.ensure_group()
        task_id = await submit(queue)
        [job] = await take(queue)
        await queue.finish(CONSUMER, [done(job, "result")])
        task = TaskCreate(prompt="hello", params={})
        hit = await queue.submit(task, signature=request_signature(task))
        assert (hit.outcome, hit.task_id) == (SubmitOutcome.CACHED, task_id)
        assert await redis_client.ttl(f"cache:{job.signature}") <= 2
        await asyncio.sleep(3.1)
        after = await queue.submit(task, signature=request_signature(task))
    finally:
        await queue.close()
    assert after.outcome is SubmitOutcome.QUEUED


async def test_a_cache_hit_refreshes_the_ttl_and_the_entry_expires_unread(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    # The TTLs are set by hand far apart, so that no delay of a loaded machine between two
    # steps can be mistaken for a refresh or for its absence.
    await submit(queue)
    [job] = await take(queue)
    await queue.finish(CONSUMER, [done(job, "r")])
    cache_key = keys_of(queue, job.task_id).cache(job.signature)
    await redis_client.pexpire(cache_key, 60_000)
    task = TaskCreate(prompt="hello")
    hit = await queue.submit(task, signature=request_signature(task))
    assert hit.outcome is SubmitOutcome.CACHED
    assert await redis_client.pttl(cache_key) > 60_000  # refreshed to CACHE_TTL, 600 s
    await redis_client.pexpire(cache_key, 100)
    await asyncio.sleep(0.3)
    assert await redis_client.exists(cache_key) == 0
    # Single-flight still names the finished task; the api finds it final and takes its place.
    miss = await queue.submit(task, signature=request_signature(task))
    assert (miss.outcome, miss.task_id) == (SubmitOutcome.COALESCED, job.task_id)
    replaced = await queue.submit(
        task, signature=request_signature(task), replacing_in_flight=job.task_id
    )
    assert replaced.outcome is SubmitOutcome.QUEUED


async def test_reading_a_done_task_is_a_pure_read_that_leaves_its_cache_ttl(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    # get_tasks.lua touches only the task keys it is given; the cached result lives CACHE_TTL
    # from its result or its last hit.
    task_id = await submit(queue)
    [job] = await take(queue)
    await queue.finish(CONSUMER, [done(job, "r")])
    cache_key = keys_of(queue, task_id).cache(job.signature)
    await redis_client.expire(cache_key, 5)
    assert await queue.get(task_id) is not None
    assert await redis_client.ttl(cache_key) <= 5


async def test_a_read_fills_every_field_of_the_task_from_its_hash(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    task_id = fresh_task_id(queue)
    await redis_client.hset(
        queue.keys.task(task_id),
        mapping={
            "status": "RUNNING", "scope": "tenant-a", "result": '{"n": 1.25}', "error": "e",
            "cached": "1", "attempts": "3", "created_at": "10.5", "started_at": "11.5",
            "finished_at": "12.5", "cancel": "1", "request": "{}", "owner": "w",
            "progress": "0.5", "progress_message": "half",
            "priority": "high", "run_at": "9.5", "deadline_at": "13.5",
        },
    )  # fmt: skip
    task = await queue.get(task_id, scope="tenant-a")
    assert task is not None
    # Every field of the model: a field the script did not return would keep its default.
    assert dict(task) == {
        "task_id": task_id, "status": TaskStatus.RUNNING, "scope": "tenant-a",
        "result": {"n": 1.25}, "error": "e", "cached": True, "attempts": 3,
        "created_at": 10.5, "started_at": 11.5, "finished_at": 12.5, "cancel_requested": True,
        "progress": 0.5, "progress_message": "half",
        "priority": Priority.HIGH, "run_at": 9.5, "deadline_at": 13.5,
    }  # fmt: skip
    assert dict(task).keys() == Task.model_fields.keys()
    # Stored and checked, but never answered.
    assert orjson.loads(task.model_dump_json()).keys() == Task.model_fields.keys() - {"scope"}


async def test_a_read_of_a_task_with_empty_fields_gives_the_defaults(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    task_id = fresh_task_id(queue)
    await redis_client.hset(
        queue.keys.task(task_id),
        mapping={"status": "PENDING", "result": "", "error": "", "attempts": ""},
    )
    task = await queue.get(task_id)
    assert task == Task(task_id=task_id, status=TaskStatus.PENDING)


async def test_the_cache_is_scoped_per_tenant(queue: RedisTaskQueue) -> None:
    task = TaskCreate(prompt="secret prompt")
    signature = request_signature(task)
    first = await queue.submit(task, signature=signature, scope="tenant-a")
    [job] = await take(queue)
    await queue.finish(CONSUMER, [done(job, "a's answer")])
    other = await queue.submit(task, signature=signature, scope="tenant-b")
    assert other.outcome is SubmitOutcome.QUEUED
    same = await queue.submit(task, signature=signature, scope="tenant-a")
    assert same.outcome is SubmitOutcome.CACHED
    assert await queue.get(first.task_id, scope="tenant-b") is None
    assert await queue.get(first.task_id, scope="tenant-a") is not None


async def test_an_idempotency_key_returns_the_first_task(queue: RedisTaskQueue) -> None:
    task = TaskCreate(prompt="once")
    signature = request_signature(task)
    first = await queue.submit(task, signature=signature, idempotency_key="k-1")
    second = await queue.submit(task, signature=signature, idempotency_key="k-1")
    assert first.outcome is SubmitOutcome.QUEUED
    assert second.outcome is SubmitOutcome.DUPLICATE
    assert second.task_id == first.task_id
    assert (await queue.stats()).stream_length == 1


async def test_a_submit_script_sent_again_stores_the_task_once(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    # What the client does when it times out waiting for a reply: the same call, same ids.
    tasks = [
        _NewTask(fresh_task_id(queue), TaskCreate(prompt=f"p{i}").canonical.decode(), f"s{i}", "",
                 "k" if i == 0 else None, "", None, Priority.NORMAL, 0.0, 0.0, True, None)
        for i in range(3)
    ]  # fmt: skip
    first = await queue._submit_many(queue.keys, tasks)
    again = await queue._submit_many(queue.keys, tasks)
    assert again == first
    assert [answer.outcome for answer in again] == [SubmitOutcome.QUEUED] * 3
    entries = await stream_entries(queue, redis_client)
    assert sorted(fields["task_id"] for _, fields in entries) == sorted(t.task_id for t in tasks)


async def test_an_idempotency_key_expires_with_its_task(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    short = RedisTaskQueue(connect(settings), settings.model_copy(update={"result_expiry": 60}))
    try:
        await short.submit(TaskCreate(prompt="x"), signature="s", idempotency_key="k")
    finally:
        await short.close()
    assert 0 < await redis_client.ttl(idempotency_key(short, "k", "s")) <= 60


async def test_an_idempotency_key_left_pointing_at_a_gone_task_is_taken_over_once(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    task = TaskCreate(prompt="once")
    first = await queue.submit(task, signature="s", idempotency_key="k")
    await redis_client.delete(keys_of(queue, first.task_id).task(first.task_id))
    answers = await asyncio.gather(
        *(
            queue.submit(task, signature="s", idempotency_key="k", replacing=first.task_id)
            for _ in range(5)
        )
    )
    assert [answer.outcome for answer in answers] == [
        SubmitOutcome.QUEUED, *[SubmitOutcome.DUPLICATE] * 4
    ]  # fmt: skip
    assert {answer.task_id for answer in answers} == {answers[0].task_id}
    # The key names the task, and the signature of the request it was first sent with.
    assert await redis_client.get(idempotency_key(queue, "k", "s")) == f"{answers[0].task_id}:s"


async def test_concurrent_submits_share_a_round_trip_and_keep_one_by_one_semantics(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    # A finished task, so that its prompt is a cache hit in the batch below.
    await submit(queue, prompt="cached")
    [job] = await take(queue)
    await queue.finish(CONSUMER, [done(job, "from the cache")])
    await redis_client.config_resetstat()
    keyed = TaskCreate(prompt="keyed")
    requests = [
        (TaskCreate(prompt="cached"), None),
        (keyed, "same-key"),
        (keyed, "same-key"),
        *((TaskCreate(prompt=f"new {i}"), None) for i in range(5)),
    ]
    answers = await asyncio.gather(
        *(
            queue.submit(task, signature=request_signature(task), idempotency_key=key)
            for task, key in requests
        )
    )
    info = await redis_client.info("commandstats")
    assert info["cmdstat_evalsha"]["calls"] == 1  # eight submits, one script call
    outcomes = [answer.outcome for answer in answers]
    assert outcomes == [
        SubmitOutcome.CACHED,
        SubmitOutcome.QUEUED,
        SubmitOutcome.DUPLICATE,  # the same key, earlier in the same batch, won
        *[SubmitOutcome.QUEUED] * 5,
    ]
    assert answers[0].result == "from the cache"
    assert answers[2].task_id == answers[1].task_id
    assert len({answer.task_id for answer in answers}) == 7
    assert (await queue.stats()).lag == 6
    records = await asyncio.gather(*(queue.get(answer.task_id) for answer in answers))
    assert [record.status if record else None for record in records] == [
        TaskStatus.DONE,
        *[TaskStatus.PENDING] * 7,
    ]


async def test_concurrent_reads_of_present_and_absent_tasks_get_their_own_answers(
    queue: RedisTaskQueue,
) -> None:
    task_ids = [await submit(queue, prompt=f"read {i}") for i in range(3)]
    asked = [task_ids[0], "0" * 32, task_ids[1], task_ids[2], "f" * 32]
    records = await asyncio.gather(*(queue.get(task_id) for task_id in asked))
    assert [record.task_id if record else None for record in records] == [
        task_ids[0],
        None,
        task_ids[1],
        task_ids[2],
        None,
    ]


async def test_a_redelivered_final_task_is_only_acknowledged(queue: RedisTaskQueue) -> None:
    await submit(queue)
    deliveries = await queue.read(CONSUMER, count=10, block_ms=100)
    [job] = await queue.start(CONSUMER, deliveries)
    await queue.finish(CONSUMER, [done(job, "first")])
    [again] = await queue.start(CONSUMER, deliveries)
    assert again.verdict is StartVerdict.SKIP
    record = await queue.get(job.task_id)
    assert record is not None
    assert (record.status, record.result) == (TaskStatus.DONE, "first")


async def test_a_done_result_is_never_overwritten(queue: RedisTaskQueue) -> None:
    await submit(queue)
    [job] = await take(queue)
    await queue.finish(CONSUMER, [done(job, "first")])
    late = await queue.finish(CONSUMER, [Finish(job, Outcome.FAILED, error="late")])
    assert late == [FinishVerdict.STALE]
    record = await queue.get(job.task_id)
    assert record is not None
    assert (record.status, record.result, record.error) == (TaskStatus.DONE, "first", None)


async def test_only_the_owner_of_a_run_writes_its_outcome(queue: RedisTaskQueue) -> None:
    await submit(queue)
    [job] = await take(queue, "worker-a")
    assert await queue.finish("worker-b", [done(job, "not mine")]) == [FinishVerdict.LOST]
    assert (await queue.stats()).pending == 1


async def test_idle_entries_are_reclaimed_and_run_again(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    await submit(queue)
    [job] = await take(queue, "dead-worker")
    # A claimer that waits 600 s finds nothing however slow this machine is; the test
    # settings' claimer (CLAIM_IDLE 2 s) finds the entry once it has been idle that long.
    patient_settings = settings.model_copy(update={"claim_idle": 600.0})
    patient = RedisTaskQueue(connect(patient_settings), patient_settings)
    try:
        assert await patient.claim_idle("live-worker", 10) == []
    finally:
        await patient.close()
    await asyncio.sleep(2.2)
    reclaimed = await queue.claim_idle("live-worker", 10)
    assert [d.task_id for d in reclaimed] == [job.task_id]
    [held] = await queue.start("live-worker", reclaimed)
    assert held.verdict is StartVerdict.SUSPECT  # it was in flight when its worker died
    [rerun] = await queue.start("live-worker", reclaimed, alone=True)
    assert (rerun.verdict, rerun.attempts) == (StartVerdict.RUN, 2)
    assert await queue.finish("dead-worker", [done(job, "zombie")]) == [FinishVerdict.LOST]
    assert await queue.finish("live-worker", [done(rerun, "ok")]) == [FinishVerdict.WRITTEN]


async def test_an_entry_whose_delivery_its_reader_never_heard_is_claimed_back_by_it(
    queue: RedisTaskQueue,
) -> None:
    """A read that timed out after Redis ran it leaves the entry pending for its reader, which
    knows nothing of it (these reads' replies stand for that). Only the reader claims it back,
    once idle, and only while it was delivered once: the reader's own held entries and
    another consumer's are left alone."""

    async def read_one(consumer: str) -> Delivery:
        [delivery] = await queue.read(consumer, count=10, block_ms=100)
        return delivery

    await submit(queue, "lost")
    lost = await read_one("reader")
    await submit(queue, "held")
    held = await read_one("reader")
    await submit(queue, "another's")
    await read_one("another-worker")

    held_ids = {held.entry_id}
    assert await queue.claim_unheard("reader", held_ids, min_idle=60, count=10) == []
    await asyncio.sleep(0.6)
    assert await queue.claim_unheard("reader", held_ids, min_idle=0.5, count=10) == [lost]
    [job] = await queue.start("reader", [lost])
    assert job.verdict is StartVerdict.RUN
    # Claimed back once, it counts as delivered twice: later it is left to the idle claim.
    await asyncio.sleep(0.6)
    assert await queue.claim_unheard("reader", held_ids, min_idle=0.5, count=10) == []


async def test_claims_find_nothing_in_a_group_that_vanished(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    """After a restart without persistence the streams and their groups are gone until the next
    read makes them again: there is nothing to claim, and no error that would end the
    worker's loops."""
    await submit(queue)
    await take(queue, "reader")
    for keys in queue.partitions.all:
        await redis_client.delete(keys.stream)
    assert await queue.claim_idle("reader", 10) == []
    assert await queue.claim_unheard("reader", (), min_idle=0, count=10) == []


async def test_upkeep_and_leaving_pass_over_a_stream_whose_group_vanished(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    """After a restart without persistence, a submit makes the stream again before any read
    makes its group: trimming, pruning consumers and leaving find nothing to do there."""
    await submit(queue)
    await take(queue, "reader")
    for keys in queue.partitions.all:
        await redis_client.delete(keys.stream)
    await submit(queue, "after the restart")
    assert await queue.trim() == 0
    await queue.leave("reader")


async def test_keep_alive_of_an_entry_whose_group_vanished_says_lost(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    """A restart without persistence took the stream, its group and the task: the run is no
    longer this worker's to keep, and keeping it alive is no error."""
    await submit(queue)
    [job] = await take(queue, "runner")
    for keys in queue.partitions.all:
        await redis_client.delete(keys.stream)
    assert await queue.keep_alive("runner", [job]) == ["lost"]


async def test_keep_alive_resets_the_idle_time_that_reclaiming_goes_by(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    await submit(queue)
    [job] = await take(queue, "busy-worker")
    await asyncio.sleep(1.0)
    renewing = time.monotonic()
    assert await queue.keep_alive("busy-worker", [job]) == ["ok"]
    [entry] = await redis_client.xpending_range(queue.keys.stream, queue.keys.group, "-", "+", 1)
    asked = time.monotonic()
    # A bound that holds however slowly this machine runs: renewed, the entry has been idle
    # no longer than since the keep-alive was sent (+1 for Redis's whole milliseconds), where
    # without the renewal it would have been idle since it was taken, over a second earlier.
    assert int(entry["time_since_delivered"]) <= (asked - renewing) * 1000 + 1
    assert await queue.keep_alive("other-worker", [job]) == ["lost"]


async def test_a_task_delivered_too_often_is_dead_lettered(
    queue: RedisTaskQueue, settings: object
) -> None:
    task_id = await submit(queue)
    deliveries = await queue.read(CONSUMER, count=10, block_ms=100)
    for attempt in range(1, 6):  # MAX_DELIVERIES = 5; each redelivery runs alone
        [job] = await queue.start(CONSUMER, deliveries, alone=attempt > 1)
        assert (job.verdict, job.attempts) == (StartVerdict.RUN, attempt)
    [job] = await queue.start(CONSUMER, deliveries)
    assert job.verdict is StartVerdict.DEAD
    record = await queue.get(task_id)
    assert record is not None
    assert record.status is TaskStatus.FAILED
    assert record.error is not None
    assert "dead-lettered" in record.error
    assert "5 times" in record.error
    [letter] = await queue.dead_letters(10)
    assert letter.task_id == task_id
    stats = await queue.stats()
    assert (stats.dead_letter_length, stats.pending) == (1, 0)


async def test_a_dead_lettered_task_stops_counting_against_its_keys_unfinished_cap(
    settings: Settings,
) -> None:
    capped = settings.model_copy(update={"max_unfinished_per_key": 1})
    queue = RedisTaskQueue(connect(capped), capped)
    await queue.ensure_group()
    try:

        async def submit_as_tenant(prompt: str) -> SubmitOutcome:
            task = TaskCreate(prompt=prompt, params={})
            submitted = await queue.submit(task, signature=request_signature(task), scope="t")
            return submitted.outcome

        assert await submit_as_tenant("first") is SubmitOutcome.QUEUED
        assert await submit_as_tenant("second") is SubmitOutcome.TOO_MANY_UNFINISHED
        deliveries = await queue.read(CONSUMER, count=10, block_ms=100)
        for attempt in range(1, 6):  # MAX_DELIVERIES = 5
            await queue.start(CONSUMER, deliveries, alone=attempt > 1)
        [job] = await queue.start(CONSUMER, deliveries)
        assert job.verdict is StartVerdict.DEAD
        assert await submit_as_tenant("second") is SubmitOutcome.QUEUED
    finally:
        await queue.close()


async def test_a_dead_letter_can_be_replayed(queue: RedisTaskQueue) -> None:
    task_id = await submit(queue)
    deliveries = await queue.read(CONSUMER, count=10, block_ms=100)
    for _ in range(6):
        await queue.start(CONSUMER, deliveries, alone=True)
    [letter] = await queue.dead_letters(10)
    assert await queue.replay_dead_letters([letter.entry_id]) == 1
    assert await queue.dead_letters(10) == []
    [job] = await take(queue)
    assert (job.task_id, job.verdict) == (task_id, StartVerdict.RUN)


async def test_a_retry_goes_back_to_pending_and_returns_when_due(queue: RedisTaskQueue) -> None:
    task_id = await submit(queue)
    [job] = await take(queue)
    retry = Finish(job, Outcome.RETRY, error="busy", due_at=time.time() + 0.5)
    assert await queue.finish(CONSUMER, [retry]) == [FinishVerdict.WRITTEN]
    record = await queue.get(task_id)
    assert record is not None
    assert (record.status, record.error) == (TaskStatus.PENDING, "busy")
    assert await queue.promote_due_retries(10) == 0
    await asyncio.sleep(0.6)
    assert await queue.promote_due_retries(10) == 1
    [again] = await take(queue)
    assert (again.task_id, again.attempts) == (task_id, 2)


async def test_due_retries_of_tasks_gone_or_cancelled_are_dropped_not_queued(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    ids = [await submit(queue, prompt=f"r{i}") for i in range(3)]
    jobs = await take(queue)
    due = time.time() - 1
    await queue.finish(CONSUMER, [Finish(j, Outcome.RETRY, error="busy", due_at=due) for j in jobs])
    await redis_client.delete(keys_of(queue, ids[0]).task(ids[0]))  # expired while it waited
    assert await queue.cancel(ids[1]) is CancelOutcome.CANCELLED
    length = len(await stream_entries(queue, redis_client))
    assert await queue.promote_due_retries(10) == 1
    for keys in queue.partitions.all:
        assert await redis_client.zcard(keys.retries) == 0
    entries = await stream_entries(queue, redis_client)
    assert len(entries) == length + 1
    last: list[tuple[str, dict[str, str]]] = await redis_client.xrange(
        keys_of(queue, ids[2]).stream
    )  # type: ignore[assignment]
    assert last[-1][1]["task_id"] == ids[2]


async def test_cancel_of_a_pending_task_means_it_never_runs(queue: RedisTaskQueue) -> None:
    task_id = await submit(queue)
    assert await queue.cancel(task_id) is CancelOutcome.CANCELLED
    [job] = await take(queue)
    assert job.verdict is StartVerdict.SKIP
    record = await queue.get(task_id)
    assert record is not None
    assert record.status is TaskStatus.CANCELLED
    assert await queue.cancel(task_id) is CancelOutcome.FINAL
    assert await queue.cancel("0" * 32) is CancelOutcome.NOT_FOUND


async def test_cancel_of_a_running_task_is_passed_to_its_worker(queue: RedisTaskQueue) -> None:
    task_id = await submit(queue)
    [job] = await take(queue)
    assert await queue.cancel(task_id) is CancelOutcome.REQUESTED
    assert await queue.keep_alive(CONSUMER, [job]) == ["cancel"]


async def test_trim_removes_only_acknowledged_entries(settings: Settings) -> None:
    # One stream: trimming drops whole stream nodes (100 entries), so a test of it needs more
    # than 100 entries in one partition.
    queue = RedisTaskQueue(connect(one_partition(settings)), one_partition(settings))
    await queue.ensure_group()
    try:
        await _check_trim(queue)
    finally:
        await queue.close()


async def _check_trim(queue: RedisTaskQueue) -> None:
    for i in range(300):
        await submit(queue, prompt=f"p{i}")
    jobs = await queue.start(CONSUMER, await queue.read(CONSUMER, count=250, block_ms=100))
    await queue.finish(CONSUMER, [done(job, "r") for job in jobs[:200]])
    await queue.trim()
    stats = await queue.stats()
    # 50 delivered but unacknowledged and 50 never delivered must all remain.
    assert stats.pending == 50
    assert stats.lag == 50
    assert 100 <= stats.stream_length < 300
    entries = await stream_entries(queue, queue.redis)
    remaining = {fields["task_id"] for _, fields in entries}
    assert {job.task_id for job in jobs[200:]} <= remaining


async def test_stats_report_lag_and_pending(queue: RedisTaskQueue) -> None:
    for i in range(5):
        await submit(queue, prompt=f"p{i}")
    stats = await queue.stats()
    assert (stats.stream_length, stats.lag, stats.pending) == (5, 5, 0)
    await queue.start(CONSUMER, await queue.read(CONSUMER, count=2, block_ms=100))
    stats = await queue.stats()
    assert (stats.lag, stats.pending) == (3, 2)


async def test_a_task_in_flight_when_its_worker_died_waits_to_run_alone(
    queue: RedisTaskQueue,
) -> None:
    await submit(queue, prompt="innocent")
    await submit(queue, prompt="poison")
    deliveries = await queue.read("crashed", count=10, block_ms=100)
    await queue.start("crashed", deliveries)  # both started, then the worker dies
    held = await queue.start("heir", deliveries)
    assert [j.verdict for j in held] == [StartVerdict.SUSPECT, StartVerdict.SUSPECT]
    for job in held:  # a suspect left waiting costs no delivery
        record = await queue.redis.hget(keys_of(queue, job.task_id).task(job.task_id), "deliveries")
        assert record == "1"
    [alone] = await queue.start("heir", deliveries[:1], alone=True)
    assert (alone.verdict, alone.attempts) == (StartVerdict.RUN, 2)


async def test_a_released_task_gives_its_delivery_back(queue: RedisTaskQueue) -> None:
    task_id = await submit(queue)
    [job] = await take(queue)
    release = Finish(job, Outcome.RELEASE, due_at=time.time())
    assert await queue.finish(CONSUMER, [release]) == [FinishVerdict.WRITTEN]
    assert await queue.promote_due_retries(10) == 1
    [again] = await take(queue)  # not a suspect: a stopping worker handed it back
    assert (again.task_id, again.verdict, again.attempts) == (task_id, StartVerdict.RUN, 1)


async def test_stats_read_the_ages_of_the_oldest_waiting_and_pending_entries(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    queue = RedisTaskQueue(connect(one_partition(settings)), one_partition(settings))
    await queue.ensure_group()
    try:
        await _check_stats_ages(queue, redis_client)
    finally:
        await queue.close()


async def _check_stats_ages(queue: RedisTaskQueue, redis_client: redis.asyncio.Redis) -> None:
    empty = await queue.stats()
    assert (empty.oldest_undelivered_age, empty.oldest_pending_age) == (0.0, 0.0)
    seconds, _ = await redis_client.time()
    # Entry ids carry the time they were added: these were added 90 s and 30 s ago.
    for age in (90, 30):
        await redis_client.xadd(
            queue.keys.stream, {"task_id": f"t{age}"}, id=f"{(seconds - age) * 1000}-0"
        )
    waiting = await queue.stats()
    assert waiting.oldest_undelivered_age == pytest.approx(90, abs=2)
    assert waiting.oldest_pending_age == 0.0
    await queue.read(CONSUMER, count=1, block_ms=100)  # hands out the 90 s entry
    handed = await queue.stats()
    assert handed.oldest_undelivered_age == pytest.approx(30, abs=2)
    assert handed.oldest_pending_age == pytest.approx(90, abs=2)
    assert (handed.lag, handed.pending, handed.consumers) == (1, 1, 1)


async def test_stats_count_the_tasks_waiting_out_a_retry(queue: RedisTaskQueue) -> None:
    await submit(queue)
    [job] = await take(queue)
    retry = Finish(job, Outcome.RETRY, error="flaky", due_at=time.time() + 600)
    assert await queue.finish(CONSUMER, [retry]) == [FinishVerdict.WRITTEN]
    stats = await queue.stats()
    assert (stats.retry_size, stats.lag, stats.pending) == (1, 0, 0)


class Announcements:
    """A subscription to one partition's events channel, as the queue announces on it: plain
    pub/sub on one server, sharded pub/sub (SSUBSCRIBE) on a cluster."""

    def __init__(self, redis_client: redis.asyncio.Redis, channel: str) -> None:
        self._client: Any = redis_client
        self._channel = channel
        self._sharded = isinstance(self._client, redis.asyncio.RedisCluster)
        self._pubsub: Any = None

    async def __aenter__(self) -> Announcements:
        if self._sharded:
            await self._client.initialize()  # the pub/sub picks its node from the slots
        self._pubsub = self._client.pubsub()
        if self._sharded:
            await self._pubsub.ssubscribe(self._channel)
        else:
            await self._pubsub.subscribe(self._channel)
        # Only once the server confirmed it does the subscription hear what comes next.
        assert await self._next(2.0, kinds=("subscribe", "ssubscribe")) == self._channel
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._pubsub.aclose()

    async def next(self, seconds: float = 2.0) -> str | None:
        return await self._next(seconds, kinds=("message", "smessage"))

    async def _next(self, seconds: float, *, kinds: tuple[str, ...]) -> str | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._sharded:
                message = await self._pubsub.get_sharded_message(timeout=0.1)
            else:
                message = await self._pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] in kinds:
                data = message["channel"] if "subscribe" in message["type"] else message["data"]
                return str(data)
        return None


async def test_a_task_cancelled_at_its_start_is_announced_at_once(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    task_id = await submit(queue)
    deliveries = await queue.read(CONSUMER, count=10, block_ms=100)
    await queue.start(CONSUMER, deliveries)
    assert await queue.cancel(task_id) is CancelOutcome.REQUESTED
    async with Announcements(redis_client, keys_of(queue, task_id).events) as announcements:
        # Its worker died; the redelivery finds the cancel request before running it again.
        [job] = await queue.start("another-worker", deliveries)
        assert job.verdict is StartVerdict.CANCELLED
        assert await announcements.next() == task_id


async def test_a_dead_lettered_task_is_announced_and_the_dead_letters_are_capped(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    # One partition: DEAD_LETTER_MAXLEN caps each partition's dead letters.
    configured = one_partition(settings, max_deliveries=1, dead_letter_maxlen=2)
    queue = RedisTaskQueue(connect(configured), configured)
    await queue.ensure_group()
    try:
        async with Announcements(redis_client, queue.keys.events) as announcements:
            dead = []
            for n in range(3):
                task_id = await submit(queue, f"poison {n}")
                deliveries = await queue.read(CONSUMER, count=10, block_ms=100)
                [first] = await queue.start(CONSUMER, deliveries)
                [job] = await queue.start(CONSUMER, deliveries, alone=True)
                assert (first.verdict, job.verdict) == (StartVerdict.RUN, StartVerdict.DEAD)
                assert await announcements.next() == task_id
                dead.append(task_id)
        letters = await queue.dead_letters(10)
    finally:
        await queue.close()
    assert [letter.task_id for letter in letters] == dead[1:]  # the oldest went first


async def test_starting_a_task_past_half_its_expiry_renews_it(
    queue: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    old, young = await submit(queue, "old"), await submit(queue, "young")
    old_key, young_key = (keys_of(queue, t).task(t) for t in (old, young))
    # The old task waited 50,000 s of its 86,400: near the end of RESULT_EXPIRY.
    await redis_client.hset(old_key, "created_at", repr(time.time() - 50_000))
    await redis_client.expire(old_key, 5)
    await redis_client.expire(young_key, 80_000)
    assert len(await take(queue)) == 2
    assert await redis_client.ttl(old_key) > 86_000
    # A task younger than half of RESULT_EXPIRY has more than half left: its start leaves it.
    assert 79_000 < await redis_client.ttl(young_key) <= 80_000


async def test_claiming_goes_on_past_live_entries_instead_of_starting_over(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    # One stream, so the order of its pending list is the order the test builds.
    configured = one_partition(settings, claim_idle=0.2)
    queue = RedisTaskQueue(connect(configured), configured)
    await queue.ensure_group()
    try:
        for n in range(30):
            await submit(queue, f"live {n}")
        live = await queue.read("live-worker", count=30, block_ms=100)
        orphans = [await submit(queue, f"orphan {n}") for n in range(3)]
        await queue.read("dead-worker", count=10, block_ms=100)
        await asyncio.sleep(0.3)
        # The live worker keeps its 30 entries fresh; they come first in the pending list.
        await redis_client.xclaim(
            queue.keys.stream, queue.keys.group, "live-worker", 0,
            [d.entry_id for d in live], justid=True,
        )  # fmt: skip
        # One entry per call: XAUTOCLAIM looks at 10 pending entries per requested one.
        claimed = []
        for _ in range(6):
            claimed += await queue.claim_idle("claimer", 1)
    finally:
        await queue.close()
    assert sorted(d.task_id for d in claimed) == sorted(orphans)
