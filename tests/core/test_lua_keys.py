"""Every Lua script declares in KEYS every key it touches: the contract Redis Cluster needs.

A server in cluster mode refuses an undeclared key only when it lies in another slot, and on
a cluster every key of the queue shares one slot, so running the scripts there proves
nothing. Instead a real server's MONITOR shows each command a script runs, the server's own
COMMAND GETKEYS names the keys in it, and each must be among the KEYS of the call that ran
the script.

The one exception is take() (start.lua reading its own batch, on a single server only): it
cannot declare task keys it has not read yet. Its undeclared keys must be exactly the keys of
the tasks it took.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from importlib import resources

import orjson
import pytest
import redis
from redis.exceptions import ResponseError

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.queue import (
    Finish,
    Job,
    Outcome,
    Report,
    StartVerdict,
    WebhookMessage,
    WebhookVerdict,
)
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.redis.console import ConsoleStore, RetryOutcome
from fastapi_redis_mini.core.redis.keys import Partitions
from fastapi_redis_mini.core.settings import Settings

from ..support.monitor import ARGUMENT, monitored, unquote

pytestmark = pytest.mark.single_server(reason="MONITOR watches the commands of one server")

CONSUMER = "keys-check"


class ScriptCalls:
    """What a MONITOR saw: each script call's declared KEYS and the commands it ran."""

    def __init__(self, lines: list[bytes]) -> None:
        self.calls: list[tuple[str, list[bytes], list[list[bytes]]]] = []
        for line in lines:
            args = [unquote(a) for a in ARGUMENT.findall(line)]
            if not args:
                continue
            if b" lua]" in line:
                if self.calls:
                    self.calls[-1][2].append(args)
            elif args[0].upper() in (b"EVALSHA", b"EVAL"):
                numkeys = int(args[2])
                self.calls.append((args[1].decode(), args[3 : 3 + numkeys], []))
            else:
                # Any other client's command ends the script before it: scripts are atomic.
                self.calls.append(("", [], []))

    def undeclared(self, client: redis.Redis) -> list[tuple[str, bytes, bytes]]:
        """(script sha, command, key) for every key a script touched without declaring it."""
        found = []
        for sha, declared, commands in self.calls:
            for command in commands:
                try:
                    keys = client.command_getkeys(*command)
                except ResponseError:
                    keys = []  # no key arguments at all (TIME, PUBLISH, ...)
                for key in keys:
                    name = key.encode() if isinstance(key, str) else key
                    if name not in declared:
                        found.append((sha, command[0], name))
        return found

    @property
    def shas(self) -> set[str]:
        return {sha for sha, _, commands in self.calls if sha}


def _script_shas() -> dict[str, str]:
    folder = resources.files("fastapi_redis_mini.core.redis").joinpath("lua")
    return {
        hashlib.sha1(entry.read_text().encode(), usedforsecurity=False).hexdigest(): entry.name
        for entry in folder.iterdir()
        if entry.name.endswith(".lua")
    }


async def _every_transition(queue: RedisTaskQueue) -> None:
    """Run every script at least once, through the queue as the services call it."""

    async def submit(
        prompt: str, idempotency_key: str | None = None, webhook: str | None = None
    ) -> str:
        task = TaskCreate(prompt=prompt, webhook=webhook)
        submitted = await queue.submit(
            task, signature=request_signature(task), scope="t", idempotency_key=idempotency_key
        )
        return submitted.task_id

    async def take(alone: bool = False) -> list[Job]:
        deliveries = await queue.read(CONSUMER, count=10, block_ms=10)
        return await queue.start(CONSUMER, deliveries, alone=alone)

    await queue.ensure_group()
    done_id = await submit("done", idempotency_key="key-1")
    [job] = await take()
    await queue.keep_alive(CONSUMER, [job])
    await queue.finish(CONSUMER, [Finish(job, Outcome.DONE, result=orjson.dumps("r"))])
    await submit("done")  # a cache hit
    assert await queue.get(done_id, "t") is not None

    cancelled_id = await submit("cancelled")
    await queue.cancel(cancelled_id, "t")
    await take()  # start ends the cancelled task

    reported_id = await submit("reported")
    [job] = await take()
    assert await queue.report(CONSUMER, job.task_id, [Report("progress", "half", 0.5)])
    read = await queue.read_events(reported_id, "t", "0-0", 10)
    assert read is not None
    assert [e.fraction for e in read.events] == [0.5]
    await queue.finish(CONSUMER, [Finish(job, Outcome.DONE, result=orjson.dumps("r"))])

    retried_id = await submit("retried")
    [job] = await take()
    await queue.finish(CONSUMER, [Finish(job, Outcome.RETRY, error="again", due_at=0.0)])
    assert await queue.promote_due_retries(10) == 1
    [job] = await take()
    await queue.finish(CONSUMER, [Finish(job, Outcome.FAILED, error="no")])
    assert await ConsoleStore(queue).retry(retried_id) is RetryOutcome.QUEUED  # from the console
    await take()

    hook = "https://hooks.example/tasks"
    hooked_id = await submit("hooked", webhook=hook)
    [job] = await take()
    message = WebhookMessage(f"msg_{hooked_id}_completed", hooked_id, hook, "completed", 1.0, {})
    done = Finish(job, Outcome.DONE, result=orjson.dumps("r"), webhook=message)
    await queue.finish(CONSUMER, [done])
    await submit("hooked", webhook=hook)  # a cache hit records its delivery
    await queue.cancel(await submit("hooked, cancelled", webhook=hook), "t")
    await take()
    await queue.enqueue_webhooks([WebhookMessage("msg_s", hooked_id, hook, "start", 1.0, {})])
    claimed = await queue.claim_webhooks(100, lease=60)
    assert len(claimed) == 4
    for message, verdict in zip(claimed, WebhookVerdict, strict=True):
        assert await queue.settle_webhook(message, verdict, due_at=time.time())

    await submit("dead", webhook=hook)
    deliveries = await queue.read(CONSUMER, count=10, block_ms=10)
    await queue.start(CONSUMER, deliveries)
    await queue.start(CONSUMER, deliveries, alone=True)  # MAX_DELIVERIES=1: dead-lettered
    dead = await queue.dead_letters(10)
    assert await queue.replay_dead_letters([d.entry_id for d in dead]) == 1

    await queue.stats()
    assert await queue.writable_partitions() == [None] * len(queue.partitions)
    await queue.trim()
    await queue.leave(CONSUMER)


async def _scheduled(queue: RedisTaskQueue) -> None:
    """Every transition again, and the scheduling ones: lanes, a delayed start, a deadline."""
    await _every_transition(queue)
    for priority in ("low", "high"):
        task = TaskCreate(prompt=f"in the {priority} lane", priority=priority)
        await queue.submit(task, signature=request_signature(task), scope="t")
    late = TaskCreate(prompt="expires", deadline_seconds=0.001)
    await queue.submit(late, signature=request_signature(late), scope="t")
    delayed = TaskCreate(prompt="delayed")
    await queue.submit(delayed, signature=request_signature(delayed), due_at=time.time())
    assert await queue.promote_due_retries(10) == 1
    deliveries = await queue.read(CONSUMER, count=10, block_ms=10)
    await asyncio.sleep(0.01)
    assert {job.verdict for job in await queue.start(CONSUMER, deliveries)} == {
        StartVerdict.RUN,
        StartVerdict.EXPIRED,
    }
    await queue.stats()


Exercise = Callable[[RedisTaskQueue], Awaitable[None]]


async def _check(settings: Settings, exercise: Exercise) -> ScriptCalls:
    queue = RedisTaskQueue(connect(settings), settings)
    await queue.redis.flushall()  # each run starts from nothing, as a deployment does
    try:
        with monitored(settings.redis_url) as lines:
            await exercise(queue)
    finally:
        await queue.close()
    return ScriptCalls(lines)


async def test_every_script_touches_only_the_keys_it_declares(settings: Settings) -> None:
    quotas = settings.model_copy(
        update={"max_deliveries": 1, "submit_rate_per_key": 100.0, "submit_burst_per_key": 100,
                "max_unfinished_per_key": 100},
    )  # fmt: skip
    # Quotas come with a single partition; several partitions run their own script calls
    # (read_group.lua, and every other one per partition).
    partitioned = settings.model_copy(update={"max_deliveries": 1, "queue_partitions": 4})
    # Priority lanes hand tasks out through dispatch.lua instead of read_group.lua.
    lanes = settings.model_copy(update={"max_deliveries": 1, "priority_lanes": True})
    runs = [
        await _check(quotas, _every_transition),
        await _check(partitioned, _every_transition),
        await _check(lanes, _scheduled),
    ]
    scripts = _script_shas()
    seen = {scripts[sha] for calls in runs for sha in calls.shas if sha in scripts}
    assert seen == set(scripts.values())
    client = redis.Redis.from_url(settings.redis_url)
    try:
        for calls in runs:
            assert calls.undeclared(client) == []
    finally:
        client.close()


async def test_the_check_finds_a_key_a_script_was_not_given(settings: Settings) -> None:
    async def undeclared(queue: RedisTaskQueue) -> None:
        await queue.redis.eval(
            "redis.call('SET', KEYS[1], '1'); return redis.call('GET', 'not-declared')",
            1,
            "declared",
        )

    calls = await _check(settings, undeclared)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert [(command, key) for _, command, key in calls.undeclared(client)] == [
            (b"GET", b"not-declared")
        ]
    finally:
        client.close()


async def test_take_touches_undeclared_only_the_keys_of_the_tasks_it_took(
    settings: Settings,
) -> None:
    taken: list[Job] = []

    async def take(queue: RedisTaskQueue) -> None:
        await queue.ensure_group()
        for n in range(3):
            task = TaskCreate(prompt=f"taken {n}")
            await queue.submit(task, signature=request_signature(task))
        taken.extend(await queue.take(CONSUMER, 10))

    calls = await _check(settings, take)
    assert len(taken) == 3
    client = redis.Redis.from_url(settings.redis_url)
    try:
        undeclared = {(command, key) for _, command, key in calls.undeclared(client)}
    finally:
        client.close()
    # HMGET and HSET of each task taken, and nothing else outside KEYS.
    keys = Partitions.from_settings(settings, cluster=False).all[0]
    expected = {
        (command, keys.task(job.task_id).encode())
        for job in taken
        for command in (b"HMGET", b"HSET")
    }
    assert undeclared == expected
