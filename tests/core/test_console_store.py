"""The console's reads and actions on a real Redis (core/redis/console.py), and what the
submit and finish scripts keep for it: capped lists and ten-second counts."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.queue import CancelOutcome, Finish, Job, Outcome, Report
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.redis.console import ConsoleStore, RetryOutcome
from fastapi_redis_mini.core.settings import Settings

from ..support.monitor import monitored, split_by_caller

CONSUMER = "console-test"


@pytest.fixture
async def small(settings: Settings) -> AsyncIterator[RedisTaskQueue]:
    """A queue whose recent-task lists keep 10 ids, with a dead letter at the first repeat."""
    configured = settings.model_copy(update={"recent_tasks": 10, "max_deliveries": 1})
    queue = RedisTaskQueue(connect(configured), configured)
    await queue.ensure_group()
    yield queue
    await queue.close()


async def submit(queue: RedisTaskQueue, prompt: str, scope: str = "") -> str:
    task = TaskCreate(prompt=prompt)
    submitted = await queue.submit(task, signature=request_signature(task), scope=scope)
    return submitted.task_id


async def take(queue: RedisTaskQueue, count: int = 100) -> list[Job]:
    deliveries = await queue.read(CONSUMER, count=count, block_ms=10)
    return await queue.start(CONSUMER, deliveries)


async def finish(queue: RedisTaskQueue, jobs: list[Job], outcome: Outcome) -> None:
    await queue.finish(
        CONSUMER, [Finish(j, outcome, result=orjson.dumps("r"), error="boom") for j in jobs]
    )


@pytest.mark.single_server(reason="reads the lists' lengths by their single-server names")
async def test_the_recent_lists_stay_within_a_tenth_over_their_cap(
    small: RedisTaskQueue, redis_client: redis.asyncio.Redis
) -> None:
    ids = [await submit(small, f"task {n}") for n in range(40)]
    await finish(small, await take(small), Outcome.DONE)
    keys = small.keys
    assert await redis_client.llen(keys.recent) <= 11
    assert await redis_client.llen(keys.finished("done")) <= 11
    store = ConsoleStore(small)
    newest = await store.recent(limit=5)
    assert [r.task_id for r in newest] == ids[::-1][:5]
    assert {r.status for r in newest} == {"DONE"}


async def test_recent_tasks_filter_by_status_and_scope(queue: RedisTaskQueue) -> None:
    store = ConsoleStore(queue)
    mine = [await submit(queue, f"mine {n}", scope="a" * 16) for n in range(3)]
    theirs = await submit(queue, "theirs", scope="b" * 16)
    jobs = await take(queue)
    failing = [j for j in jobs if j.task_id in (mine[0], theirs)]
    await finish(queue, failing, Outcome.FAILED)
    await finish(queue, [j for j in jobs if j not in failing], Outcome.DONE)

    failed = await store.recent(status="FAILED")
    assert {r.task_id for r in failed} == {mine[0], theirs}
    assert [r.task_id for r in await store.recent(status="FAILED", scope="a" * 16)] == [mine[0]]
    assert {r.task_id for r in await store.recent(scope="a" * 16)} == set(mine)
    assert await store.recent(status="PENDING") == []
    assert all(r.fields["error"] == "boom" for r in failed)


async def test_tasks_that_ended_outside_finish_are_found_by_their_status(
    small: RedisTaskQueue,
) -> None:
    store = ConsoleStore(small)
    cancelled = await submit(small, "cancelled while pending")
    dead = await submit(small, "dead-lettered")
    assert await store.cancel(cancelled) is CancelOutcome.CANCELLED
    deliveries = await small.read(CONSUMER, count=10, block_ms=10)
    await small.start(CONSUMER, deliveries)
    await small.start(CONSUMER, deliveries, alone=True)  # MAX_DELIVERIES=1: dead
    assert [r.task_id for r in await store.recent(status="CANCELLED")] == [cancelled]
    assert [r.task_id for r in await store.recent(status="FAILED")] == [dead]


async def test_finished_tasks_are_counted_in_ten_second_buckets(queue: RedisTaskQueue) -> None:
    for n in range(5):
        await submit(queue, f"counted {n}")
    jobs = await take(queue)
    await finish(queue, jobs[:3], Outcome.DONE)
    await finish(queue, jobs[3:4], Outcome.FAILED)
    await finish(queue, jobs[4:], Outcome.CANCELLED)
    overview = await ConsoleStore(queue).overview(buckets=30)
    assert len(overview.counts) == 30
    starts = [c.start for c in overview.counts]
    assert starts == sorted(starts)
    assert all(b - a == 10 for a, b in itertools.pairwise(starts))
    totals = [sum(getattr(c, name) for c in overview.counts) for name in ("done", "failed",
                                                                          "cancelled")]  # fmt: skip
    assert totals == [3, 1, 1]


async def test_retry_queues_a_failed_or_cancelled_task_again_and_nothing_else(
    queue: RedisTaskQueue,
) -> None:
    store = ConsoleStore(queue)
    failed, done = await submit(queue, "fails"), await submit(queue, "works")
    jobs = await take(queue)
    await finish(queue, [j for j in jobs if j.task_id == failed], Outcome.FAILED)
    await finish(queue, [j for j in jobs if j.task_id == done], Outcome.DONE)

    assert await store.retry(done) is RetryOutcome.NOT_FAILED
    assert await store.retry("0" * 32) is RetryOutcome.NOT_FOUND
    assert await store.retry(failed) is RetryOutcome.QUEUED
    record = await store.task(failed)
    assert record is not None
    assert record.status == "PENDING"
    assert record.fields["last_error"] == "boom"
    assert "error" not in record.fields
    assert "finished_at" not in record.fields
    [again] = await take(queue)
    assert again.task_id == failed
    assert again.attempts == 1


async def test_the_console_cancels_any_tenants_task(queue: RedisTaskQueue) -> None:
    store = ConsoleStore(queue)
    task_id = await submit(queue, "a tenant's", scope="c" * 16)
    assert await queue.cancel(task_id, "") is CancelOutcome.NOT_FOUND  # another tenant's view
    assert await store.cancel(task_id) is CancelOutcome.CANCELLED
    assert await store.cancel("0" * 32) is CancelOutcome.NOT_FOUND


async def test_dead_letters_are_listed_replayed_and_deleted(small: RedisTaskQueue) -> None:
    store = ConsoleStore(small)
    first, second = await submit(small, "dies"), await submit(small, "dies too")
    deliveries = await small.read(CONSUMER, count=10, block_ms=10)
    await small.start(CONSUMER, deliveries)
    # Delivered once already: each is dead at its second start. One after the other, a few
    # milliseconds apart: on a cluster the two sit in different partitions, and the list
    # orders letters across partitions by their stream time, which would otherwise tie.
    by_task = {d.task_id: d for d in deliveries}
    await small.start(CONSUMER, [by_task[first]], alone=True)
    await asyncio.sleep(0.01)
    await small.start(CONSUMER, [by_task[second]], alone=True)
    letters = await store.dead_letters()
    assert [d.task_id for d in letters] == [second, first]  # newest first
    one = await store.dead_letter(letters[0].entry_id)
    assert one is not None
    assert one.task_id == second
    assert await store.dead_letter("no-such-id") is None
    assert await store.dead_letter("9-9") is None

    assert await store.replay([letters[0].entry_id, "junk"]) == 1
    assert await store.delete_dead_letters([letters[1].entry_id, "junk"]) == 1
    assert await store.dead_letters() == []
    record = await store.task(second)
    assert record is not None
    assert record.status == "PENDING"


async def test_workers_show_the_tasks_they_hold_and_scheduled_the_due_order(
    queue: RedisTaskQueue,
) -> None:
    store = ConsoleStore(queue)
    held = await submit(queue, "held")
    later, sooner = await submit(queue, "later"), await submit(queue, "sooner")
    jobs = {j.task_id: j for j in await take(queue)}
    await queue.finish(CONSUMER, [
        Finish(jobs[later], Outcome.RETRY, error="x", due_at=2_000_000_000.0),
        Finish(jobs[sooner], Outcome.RETRY, error="x", due_at=1_900_000_000.0),
    ])  # fmt: skip
    # A worker is a consumer in every partition's group; it holds the task in one of them.
    mine = [w for w in await store.workers() if w.name == CONSUMER]
    assert len(mine) == len(queue.partitions)
    assert [(w.partition, w.pending, w.held) for w in mine if w.pending] == [
        (queue.partitions.of_task(held).index, 1, (held,))  # type: ignore[union-attr]
    ]
    assert [s.task_id for s in await store.scheduled()] == [sooner, later]


async def test_scheduled_tells_delayed_starts_from_retries(queue: RedisTaskQueue) -> None:
    store = ConsoleStore(queue)
    retried = await submit(queue, "retried")
    [job] = await take(queue)
    await queue.finish(CONSUMER, [Finish(job, Outcome.RETRY, error="x", due_at=1_900_000_000.0)])
    task = TaskCreate(prompt="delayed")
    delayed = await queue.submit(task, signature=request_signature(task), due_at=1_800_000_000.0)
    shown = await store.scheduled()
    assert [(s.task_id, s.delayed, s.run_at) for s in shown] == [
        (delayed.task_id, True, 1_800_000_000.0),
        (retried, False, None),
    ]


async def test_a_tasks_events_are_its_newest_reports_in_order(queue: RedisTaskQueue) -> None:
    store = ConsoleStore(queue)
    task_id = await submit(queue, "reports")
    [job] = await take(queue)
    reports = [Report("output", f"chunk {n}", 0.0) for n in range(5)]
    assert await queue.report(CONSUMER, task_id, [*reports, Report("progress", "done", 1.0)])
    shown = await store.events(task_id, limit=3)
    assert shown.total == 6
    assert [(e.kind, e.text, e.fraction, e.attempt) for e in shown.events] == [
        ("output", "chunk 3", 0.0, 1),
        ("output", "chunk 4", 0.0, 1),
        ("progress", "done", 1.0, 1),
    ]
    assert job.task_id == task_id
    nothing = await store.events(await submit(queue, "silent"))
    assert (nothing.events, nothing.total) == ([], 0)


@pytest.mark.single_server(reason="MONITOR watches the commands of one server")
async def test_a_page_reads_a_bounded_amount_however_many_tasks_there_are(
    queue: RedisTaskQueue,
) -> None:
    store = ConsoleStore(queue)
    for n in range(600):
        task_id = await submit(queue, f"many {n}")
    for read in (
        lambda: store.recent(limit=20),
        lambda: store.recent(status="FAILED", scope="d" * 16, limit=20),
        store.dead_letters,
        store.workers,
        store.scheduled,
        store.overview,
        lambda: store.events(task_id),
    ):
        with monitored(queue.settings.redis_url) as lines:
            await read()
        sent, scripted = split_by_caller(lines)
        names = {args[0].upper() for args in sent + scripted}
        assert not names & {b"KEYS", b"SCAN", b"HSCAN", b"SSCAN", b"ZSCAN"}
        # At most: two list heads, a hash read per id in them (a filter's window of 200
        # each), and the stats script; never one per stored task.
        assert len(sent) + len(scripted) <= 2 + 2 * 200 + 40, sorted(names)
