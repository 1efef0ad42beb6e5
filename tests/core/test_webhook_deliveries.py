"""Webhook deliveries kept in Redis: recorded with the final status, claimed under a lease,
settled once. Each script runs on a real server; the worker's sender is tested in e2e."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.queue import (
    Finish,
    Job,
    Outcome,
    QueueStats,
    StartVerdict,
    SubmitOutcome,
    WebhookMessage,
    WebhookVerdict,
)
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.core.telemetry.metrics import QueueStateCollector

CONSUMER = "webhooks"
HOOK = "https://hooks.example/tasks"
# Enough for every partition a share (a cluster has 16): one call sees every due delivery.
CLAIM = 64


async def submit(queue: RedisTaskQueue, prompt: str, **fields: object) -> tuple[str, TaskCreate]:
    task = TaskCreate.model_validate({"prompt": prompt, **fields})
    submitted = await queue.submit(task, signature=request_signature(task))
    return submitted.task_id, task


async def take(queue: RedisTaskQueue, *, alone: bool = False) -> list[Job]:
    deliveries = await queue.read(CONSUMER, count=10, block_ms=10)
    return await queue.start(CONSUMER, deliveries, alone=alone)


def completed(task_id: str) -> WebhookMessage:
    data = {"task_id": task_id, "status": "DONE", "result": "r"}
    return WebhookMessage(f"msg_{task_id}_completed", task_id, HOOK, "completed", 1.5, data)


async def test_a_final_outcome_records_its_delivery_and_one_without_a_webhook_records_none(
    queue: RedisTaskQueue,
) -> None:
    hooked_id, _ = await submit(queue, "hooked", webhook=HOOK)
    plain_id, _ = await submit(queue, "plain")
    jobs = {job.task_id: job for job in await take(queue)}
    assert jobs[hooked_id].webhook == HOOK
    finishes = [
        Finish(jobs[hooked_id], Outcome.DONE, orjson.dumps("r"), webhook=completed(hooked_id)),
        Finish(jobs[plain_id], Outcome.DONE, orjson.dumps("r")),
    ]
    await queue.finish(CONSUMER, finishes)
    [message] = await queue.claim_webhooks(CLAIM, lease=60)
    expected = WebhookMessage(
        f"msg_{hooked_id}_completed", hooked_id, HOOK, "completed", 1.5,
        {"task_id": hooked_id, "status": "DONE", "result": "r"}, attempt=1,
    )  # fmt: skip
    expected.partition = message.partition  # the task's own partition; settling uses it
    assert message == expected
    assert await queue.settle_webhook(message, WebhookVerdict.DELIVERED)


async def test_a_retried_outcome_records_no_delivery_until_the_task_ends(
    queue: RedisTaskQueue,
) -> None:
    task_id, _ = await submit(queue, "retried", webhook=HOOK)
    [job] = await take(queue)
    # The worker attaches a message to final outcomes only; a RETRY carrying one is ignored.
    retry = Finish(job, Outcome.RETRY, error="again", due_at=0.0, webhook=completed(task_id))
    await queue.finish(CONSUMER, [retry])
    assert await queue.claim_webhooks(CLAIM, lease=60) == []


async def test_a_claim_is_a_lease_another_sender_takes_once_it_lapses(
    queue: RedisTaskQueue,
) -> None:
    # A real task's id: on a cluster the id names its partition, where the delivery waits.
    task_id, _ = await submit(queue, "leased", webhook=HOOK)
    await queue.enqueue_webhooks([completed(task_id)])
    [first] = await queue.claim_webhooks(CLAIM, lease=0.3)
    assert await queue.claim_webhooks(CLAIM, lease=0.3) == []  # held
    await asyncio.sleep(0.4)  # its sender died: nothing settled it
    [second] = await queue.claim_webhooks(CLAIM, lease=60)
    assert (second.message_id, second.attempt) == (first.message_id, 2)
    # The first sender comes back late: it cannot reschedule what another sender holds ...
    first.last_error = "late"
    assert not await queue.settle_webhook(first, WebhookVerdict.RETRY, due_at=time.time())
    assert not await queue.settle_webhook(first, WebhookVerdict.DEAD)
    assert await queue.webhook_dead_letters(10) == []
    # ... but a delivery it made counts, whoever holds the message now.
    assert await queue.settle_webhook(first, WebhookVerdict.DELIVERED)
    assert not await queue.settle_webhook(second, WebhookVerdict.DELIVERED)
    await asyncio.sleep(0.1)
    assert await queue.claim_webhooks(CLAIM, lease=60) == []


async def test_a_retry_waits_its_backoff_and_a_release_takes_its_attempt_back(
    queue: RedisTaskQueue,
) -> None:
    task_id, _ = await submit(queue, "retried later", webhook=HOOK)
    await queue.enqueue_webhooks([completed(task_id)])
    [message] = await queue.claim_webhooks(CLAIM, lease=60)
    message.last_error = "answered 500"
    assert await queue.settle_webhook(message, WebhookVerdict.RETRY, due_at=time.time() + 0.3)
    assert await queue.claim_webhooks(CLAIM, lease=60) == []
    await asyncio.sleep(0.4)
    [again] = await queue.claim_webhooks(CLAIM, lease=60)
    assert (again.attempt, again.last_error) == (2, "answered 500")
    assert await queue.settle_webhook(again, WebhookVerdict.RELEASE)
    [released] = await queue.claim_webhooks(CLAIM, lease=60)
    assert released.attempt == 2
    released.last_error = "answered 503"
    assert await queue.settle_webhook(released, WebhookVerdict.DEAD)
    [dead] = await queue.webhook_dead_letters(10)
    assert {k: dead.fields[k] for k in ("message_id", "url", "event", "attempts", "error")} == {
        "message_id": released.message_id,
        "url": HOOK,
        "event": "completed",
        "attempts": "2",
        "error": "answered 503",
    }
    assert await queue.claim_webhooks(CLAIM, lease=60) == []


async def test_cancelling_a_pending_task_records_its_completed_delivery(
    queue: RedisTaskQueue,
) -> None:
    task_id, _ = await submit(queue, "cancelled", webhook=HOOK)
    await queue.cancel(task_id)
    [message] = await queue.claim_webhooks(CLAIM, lease=60)
    assert (message.task_id, message.url, message.event) == (task_id, HOOK, "completed")
    assert message.data["status"] == "CANCELLED"
    assert message.data["error"] == "cancelled before it started"
    assert message.data["result"] is None
    # The worker that later receives the entry only acknowledges it: no second delivery.
    assert [job.verdict for job in await take(queue)] == [StartVerdict.SKIP]
    assert await queue.claim_webhooks(CLAIM, lease=60) == []


async def test_a_task_dead_lettered_by_start_records_its_completed_delivery(
    settings: Settings,
) -> None:
    configured = settings.model_copy(update={"max_deliveries": 1})
    queue = RedisTaskQueue(connect(configured), configured)
    try:
        await queue.ensure_group()
        task_id, _ = await submit(queue, "poison", webhook=HOOK, webhook_events=["completed"])
        deliveries = await queue.read(CONSUMER, count=10, block_ms=10)
        await queue.start(CONSUMER, deliveries)  # its worker dies mid-run
        [job] = await queue.start(CONSUMER, deliveries, alone=True)
        assert job.verdict is StartVerdict.DEAD
        [message] = await queue.claim_webhooks(CLAIM, lease=60)
    finally:
        await queue.close()
    assert message.task_id == task_id
    assert message.data["status"] == "FAILED"
    assert message.data["error"].startswith("dead-lettered: delivered 1 times")
    assert message.data["attempts"] == 1


async def test_a_task_that_ends_again_after_a_replay_gets_a_delivery_of_its_own(
    settings: Settings,
) -> None:
    configured = settings.model_copy(update={"max_deliveries": 1})
    queue = RedisTaskQueue(connect(configured), configured)
    ids = []
    try:
        await queue.ensure_group()
        await submit(queue, "poison twice", webhook=HOOK)
        for _ in range(2):
            deliveries = await queue.read(CONSUMER, count=10, block_ms=10)
            await queue.start(CONSUMER, deliveries)
            [job] = await queue.start(CONSUMER, deliveries, alone=True)
            assert job.verdict is StartVerdict.DEAD
            [message] = await queue.claim_webhooks(CLAIM, lease=60)
            assert await queue.settle_webhook(message, WebhookVerdict.DELIVERED)
            ids.append(message.message_id)
            dead = await queue.dead_letters(10)
            assert await queue.replay_dead_letters([d.entry_id for d in dead]) == 1
            await asyncio.sleep(0.01)
    finally:
        await queue.close()
    assert len(set(ids)) == 2  # a receiver deduping by id still hears of the second end


async def test_a_cache_hit_with_a_webhook_records_a_delivery_of_the_cached_result(
    queue: RedisTaskQueue,
) -> None:
    done_id, _ = await submit(queue, "computed once", webhook=HOOK)
    [job] = await take(queue)
    result = {"output": "r", "n": [1, 2.5]}
    done = Finish(job, Outcome.DONE, orjson.dumps(result), webhook=completed(done_id))
    await queue.finish(CONSUMER, [done])
    [message] = await queue.claim_webhooks(CLAIM, lease=60)
    assert await queue.settle_webhook(message, WebhookVerdict.DELIVERED)

    task = TaskCreate(prompt="computed once", webhook=HOOK)
    hits = [await queue.submit(task, signature=request_signature(task)) for _ in range(2)]
    assert [hit.outcome for hit in hits] == [SubmitOutcome.CACHED] * 2
    messages = await queue.claim_webhooks(CLAIM, lease=60)
    assert len({m.message_id for m in messages}) == 2  # one per submit answered
    for message in messages:
        assert message.message_id != f"msg_{done_id}_completed"  # not the computing task's
        assert (message.task_id, message.url) == (done_id, HOOK)
        assert message.data == {
            "task_id": done_id,
            "status": "DONE",
            "error": None,
            "cached": True,
            "result": result,
        }


@pytest.mark.parametrize("events", [["start"], ["progress", "output"]])
async def test_no_completed_delivery_is_recorded_for_a_webhook_that_did_not_ask_for_one(
    queue: RedisTaskQueue, events: list[str]
) -> None:
    fields = {"webhook": HOOK, "webhook_events": events}
    cancelled_id, _ = await submit(queue, "cancelled", **fields)
    await queue.cancel(cancelled_id)
    _, task = await submit(queue, "done", **fields)
    [job] = [j for j in await take(queue) if j.verdict is StartVerdict.RUN]
    await queue.finish(CONSUMER, [Finish(job, Outcome.DONE, orjson.dumps("r"))])
    hit = await queue.submit(task, signature=request_signature(task))
    assert hit.outcome is SubmitOutcome.CACHED
    assert await queue.claim_webhooks(CLAIM, lease=60) == []


async def test_the_webhook_gauges_count_deliveries_waiting_and_dead_lettered_per_partition(
    settings: Settings,
) -> None:
    configured = settings.model_copy(update={"queue_partitions": 2})
    queue = RedisTaskQueue(connect(configured), configured)
    await queue.ensure_group()
    try:
        # One task in each partition; the first gets two deliveries, the second one.
        by_partition: dict[int | None, str] = {}
        n = 0
        while len(by_partition) < 2:
            task_id, _ = await submit(queue, f"gauged {n}", webhook=HOOK)
            by_partition.setdefault(queue.partition_of(task_id), task_id)
            n += 1
        first, second = by_partition[0], by_partition[1]
        await queue.enqueue_webhooks([
            WebhookMessage(f"msg_{first}_a", first, HOOK, "start", 1.0, {}),
            WebhookMessage(f"msg_{first}_b", first, HOOK, "completed", 2.0, {}),
            WebhookMessage(f"msg_{second}_a", second, HOOK, "completed", 1.0, {}),
        ])  # fmt: skip

        def gauges(stats: QueueStats) -> dict[str, float]:
            registry = CollectorRegistry()
            registry.register(QueueStateCollector(stats))
            return {
                f"{sample.name}{sample.labels.get('partition', '')}": sample.value
                for family in text_string_to_metric_families(generate_latest(registry).decode())
                for sample in family.samples
                if "webhook" in sample.name
            }

        waiting = {
            "fastapi_redis_mini_webhook_deliveries_pending": 3,
            "fastapi_redis_mini_partition_webhook_deliveries_pending0": 2,
            "fastapi_redis_mini_partition_webhook_deliveries_pending1": 1,
            "fastapi_redis_mini_webhook_dead_letter_length": 0,
            "fastapi_redis_mini_partition_webhook_dead_letter_length0": 0,
            "fastapi_redis_mini_partition_webhook_dead_letter_length1": 0,
        }
        assert gauges(await queue.stats()) == waiting
        claimed = await queue.claim_webhooks(CLAIM, lease=60)
        assert gauges(await queue.stats()) == waiting  # being attempted: not settled yet

        delivered, dead = [m for m in claimed if m.task_id == first]
        assert await queue.settle_webhook(delivered, WebhookVerdict.DELIVERED)
        dead.last_error = "answered 500"
        assert await queue.settle_webhook(dead, WebhookVerdict.DEAD)
        assert gauges(await queue.stats()) == {
            **waiting,
            "fastapi_redis_mini_webhook_deliveries_pending": 1,
            "fastapi_redis_mini_partition_webhook_deliveries_pending0": 0,
            "fastapi_redis_mini_webhook_dead_letter_length": 1,
            "fastapi_redis_mini_partition_webhook_dead_letter_length0": 1,
        }
    finally:
        await queue.close()


async def test_every_recorded_delivery_carries_the_scope_of_the_key_that_asked_for_it(
    queue: RedisTaskQueue,
) -> None:
    # A sender picks the secret that signs a delivery by its scope (core/webhooks.py).
    scope = "0123456789abcdef"
    later = TaskCreate(prompt="cancelled before it starts", webhook=HOOK, delay_seconds=600)
    cancelled = await queue.submit(later, signature=request_signature(later), scope=scope)
    await queue.cancel(cancelled.task_id, scope)
    computed = TaskCreate(prompt="computed, then a cache hit", webhook=HOOK)
    done = await queue.submit(computed, signature=request_signature(computed), scope=scope)
    [job] = [j for j in await take(queue) if j.verdict is StartVerdict.RUN]
    assert job.scope == scope
    await queue.enqueue_webhooks(
        [WebhookMessage("msg_start", done.task_id, HOOK, "start", 1.0, {}, job.scope)]
    )
    await queue.finish(CONSUMER, [Finish(job, Outcome.DONE, orjson.dumps("r"))])
    hit = await queue.submit(computed, signature=request_signature(computed), scope=scope)
    assert hit.outcome is SubmitOutcome.CACHED

    messages = await queue.claim_webhooks(CLAIM, lease=60)
    assert sorted((m.task_id, m.event) for m in messages) == sorted([
        (cancelled.task_id, "completed"), (done.task_id, "start"), (done.task_id, "completed"),
    ])  # fmt: skip
    assert {m.scope for m in messages} == {scope}
