"""The Redis Streams implementation of TaskQueue: the RedisTaskQueue class.

Every multi-step change of state is one Lua script (see lua/), so it is atomic, and batches
travel in one round trip: a worker's deliveries and outcomes, and the api's submits and reads
that meet in one process (see batching.Coalescer).

This module owns the class: its making (the scripts it loads) and closing, the api's reads
and actions (get, wait, cancel, read_events, follow, stats, the write probes) and the
partition helpers. The class is composed of parts beside it, each module saying what it owns:
_submit.py (submits), _worker.py (the worker's calls and upkeep), _webhook_store.py (durable
webhook deliveries) and _operators.py (dead letters and their replay), each a base over
_base.py (the state the parts share, and the `_translated` decorator the methods wear), which
extends _routing.py (how a script call reaches its slot's node); _replies.py parses the
scripts' replies. The rest: _errors.py (what a redis-py error means for the queue),
_connect.py (the client and cluster detection), _durability.py (DURABLE_ACKS), _fairness.py
(reading every partition in turn), _avoidance.py (where an unkeyed submit goes while its
partition cannot confirm), _subscription.py (pub/sub) and _webhook_messages.py (how a webhook
delivery is kept). Their public names, and the names other modules import from here, are
imported here too, where they were before the splits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from ..batching import Coalescer
from ..models import Task, TaskStatus
from ..queue import (
    CancelOutcome,
    LaneStats,
    QueueState,
    QueueStats,
    QueueUnavailable,
    TaskEvent,
    TaskEvents,
)
from ..settings import Settings
from ._avoidance import AvoidedPartitions
from ._base import _translated as _translated
from ._connect import Client, connect, is_cluster
from ._durability import check_durable_acks, durable_wait, exit_unless_durable_acks
from ._errors import queue_error, torn_down
from ._operators import OperatorSide
from ._replies import _partition_stats
from ._submit import SubmitSide, new_task_id
from ._submit import _NewTask as _NewTask
from ._subscription import Subscription
from ._webhook_store import WebhookStore
from ._worker import COUNTS_BUCKET_SECONDS as COUNTS_BUCKET_SECONDS
from ._worker import COUNTS_KEPT_SECONDS as COUNTS_KEPT_SECONDS
from ._worker import WorkerSide
from .keys import Keys, Partitions, layout, layout_reasons

log = logging.getLogger(__name__)

__all__ = [
    "Client",
    "RedisTaskQueue",
    "check_durable_acks",
    "connect",
    "exit_unless_durable_acks",
    "is_cluster",
    "new_task_id",
    "queue_error",
    "record_layout_at_start",
    "torn_down",
]


def _load_script(redis: Client, name: str) -> AsyncScript:
    source = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
    return redis.register_script(source)


class RedisTaskQueue(SubmitSide, WorkerSide, WebhookStore, OperatorSide):
    """Tasks in `task:{id}` hashes, results in `cache:{signature}`, work in a consumer group.

    The keys form QUEUE_PARTITIONS partitions (see keys.Partitions), each with its own stream
    under its own hash tag: every script call touches the keys of one partition, and a call
    that concerns several partitions becomes one script call per partition, pipelined (a
    cluster client sends each node its share of the pipeline at once).

    Its submits, worker calls, webhook deliveries and dead letters are bases of it, each in a
    module of its own (see this module's docstring); the api's side is here.
    """

    def __init__(self, redis: Client, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        cluster = isinstance(redis, RedisCluster)
        self.slots_unknown = cluster  # see learn_slots()
        self.partitions = Partitions.from_settings(settings, cluster=cluster)
        self.keys = self.partitions.all[0]  # the only partition's, with QUEUE_PARTITIONS=1
        # Sharded pub/sub on a cluster: a message stays on the shard of its partition instead
        # of being broadcast to every node.
        self._publish = "SPUBLISH" if cluster else "PUBLISH"
        # Workers wait on the work channel when they cannot block on one stream: with several
        # partitions, or with lanes, whose tasks are not in the stream until dispatched.
        self._announces_work = len(self.partitions) > 1 or settings.priority_lanes
        self.takes = not cluster and not self._announces_work  # see WorkerSide
        # One name per thing: `_<name>_script` runs lua/<name>.lua; `read()` alone is XREADGROUP.
        self._submit_script = _load_script(redis, "submit")
        self._start_script = _load_script(redis, "start")
        self._finish_script = _load_script(redis, "finish")
        self._keep_alive_script = _load_script(redis, "keep_alive")
        self._promote_script = _load_script(redis, "promote")
        self._trim_script = _load_script(redis, "trim")
        self._trim_turns_script = _load_script(redis, "trim_turns")
        self._cancel_script = _load_script(redis, "cancel")
        self._get_tasks_script = _load_script(redis, "get_tasks")
        self._replay_script = _load_script(redis, "replay")
        self._prune_script = _load_script(redis, "prune_consumers")
        self._stats_script = _load_script(redis, "stats")
        self._read_group_script = _load_script(redis, "read_group")
        self._report_script = _load_script(redis, "report")
        self._read_events_script = _load_script(redis, "read_events")
        self._dispatch_script = _load_script(redis, "dispatch")
        self._probe_script = _load_script(redis, "probe")
        self._webhook_enqueue_script = _load_script(redis, "webhook_enqueue")
        self._webhook_claim_script = _load_script(redis, "webhook_claim")
        self._webhook_settle_script = _load_script(redis, "webhook_settle")
        self._webhook_turn = 0  # the partition the next claim of deliveries starts at
        # Partitions that failed a submit lately: unkeyed submits go elsewhere meanwhile.
        self._avoided = AvoidedPartitions()
        events = [keys.events for keys in self.partitions.all]
        self._completions = Subscription(redis, events, sharded=cluster, name="completions")
        # Workers of several partitions sleep until a submit announces new entries.
        self._work_announced = Subscription(
            redis, [keys.work for keys in self.partitions.all], sharded=cluster, name="work"
        )
        # Event streams wake on a task's start and reports, and on its end; subscribed on the
        # first stream a process serves.
        self._task_events = Subscription(
            redis,
            [keys.reports for keys in self.partitions.all] + events,
            sharded=cluster,
            name="task events",
        )
        # (consumer, partition) -> where its XAUTOCLAIM scan is
        self._claim_cursors: dict[tuple[str, int], str] = {}
        self._read_turn = 0  # the partition the next fair read starts at
        self._claim_turn = 0
        self._durable_wait = durable_wait(settings)
        # The api's two hot paths: the submit() and get() calls that meet in one process go
        # to Redis together, one script call per batch (see Coalescer): submit() ->
        # _submit_coalescer -> _submit_many -> submit.lua; get() -> _get_coalescer ->
        # _get_many -> get_tasks.lua.
        # One pair of coalescers per partition, so a batch is one script call in one slot.
        self._submit_coalescers = [
            Coalescer(functools.partial(self._submit_many, keys)) for keys in self.partitions.all
        ]
        self._get_coalescers = [
            Coalescer(functools.partial(self._get_many, keys)) for keys in self.partitions.all
        ]

    async def open(self) -> None:
        """Subscribe to completions, so that long-polls are woken as soon as a task finishes."""
        await self._completions.start()

    async def close(self) -> None:
        for submits in self._submit_coalescers:
            await submits.close()
        for gets in self._get_coalescers:
            await gets.close()
        await self._completions.close()
        await self._work_announced.close()
        await self._task_events.close()
        await self.redis.aclose()

    # -- the api side

    @_translated
    async def get(self, task_id: str, scope: str = "") -> Task | None:
        partition = self.partitions.of_task(task_id)
        if partition is None:
            return None
        fields = await self._get_coalescers[partition.index](task_id)
        if "status" not in fields or fields.get("scope", "") != scope:
            return None
        if "result" in fields:
            fields["result"] = orjson.loads(fields["result"])
        fields["task_id"] = task_id
        task = Task.model_validate(fields)
        if (
            task.status is TaskStatus.PENDING
            and task.deadline_at is not None
            and task.deadline_at < time.time()
            and not task.attempts
        ):
            # What the worker that reaches it will write (start.lua); said now, as the client
            # should not wait for a task that will never run.
            task.status = TaskStatus.EXPIRED
        return task

    async def _get_many(self, partition: Keys, task_ids: Sequence[str]) -> list[dict[str, Any]]:
        reply = await self._get_tasks_script(keys=[partition.task(t) for t in task_ids])
        tasks: list[dict[str, Any]] = orjson.loads(reply)
        return tasks

    @_translated
    async def wait(self, task_id: str, scope: str, seconds: float) -> Task | None:
        async with self._completions.watch(task_id) as finished:
            deadline = time.monotonic() + seconds
            while True:
                task = await self.get(task_id, scope)
                remaining = deadline - time.monotonic()
                if task is None or task.status.is_final or remaining <= 0:
                    return task
                # The notification is the fast path; the periodic re-read only covers a
                # notification lost while the subscriber was reconnecting.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), min(remaining, 5.0))
                finished.clear()

    @_translated
    async def cancel(self, task_id: str, scope: str = "") -> CancelOutcome:
        partition = self.partitions.of_task(task_id)
        if partition is None:
            return CancelOutcome.NOT_FOUND
        # A cancel's 202 is an acknowledgement too: with DURABLE_ACKS it waits like a submit.
        reply = await self._call(
            self._cancel_script,
            [
                partition.task(task_id),
                partition.unfinished(scope),
                partition.webhooks_due,
                partition.webhook_messages,
            ],
            args=[scope, repr(time.time()), partition.events, task_id, self._publish],
        )
        return CancelOutcome(reply)

    @_translated
    async def read_events(
        self, task_id: str, scope: str, after: str, count: int
    ) -> TaskEvents | None:
        partition = self.partitions.of_task(task_id)
        if partition is None:
            return None
        reply = orjson.loads(
            await self._read_events_script(
                keys=[partition.task(task_id), partition.task_events(task_id)],
                args=[after, count],
            )
        )
        fields = reply.get("task")
        if not fields or fields.get("scope", "") != scope:
            return None
        if "result" in fields:
            fields["result"] = orjson.loads(fields["result"])
        fields["task_id"] = task_id
        # cjson writes an empty array as {}.
        events = [
            TaskEvent(entry_id, kind, text, float(fraction or 0), int(attempt))
            for entry_id, kind, fraction, text, attempt in reply["events"] or ()
        ]
        return TaskEvents(Task.model_validate(fields), events)

    @contextlib.asynccontextmanager
    async def follow(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        async with self._task_events.watch(task_id) as changed:
            yield changed

    @_translated
    async def stats(self) -> QueueStats:
        parts = self.partitions.all
        calls = [
            ([k.stream, k.dead_letter, k.retries, *k.lanes, k.webhooks_due, k.webhooks_dead],
             [k.group])
            for k in parts
        ]  # fmt: skip
        replies = await self._call_each(self._stats_script, calls)
        each = tuple(
            _partition_stats(keys, reply) for keys, reply in zip(parts, replies, strict=True)
        )
        if len(each) == 1:
            return dataclasses.replace(each[0], partition=None)
        return QueueStats(
            stream=self.settings.queue_key,
            group=self.settings.consumer_group,
            stream_length=sum(p.stream_length for p in each),
            lag=sum(p.lag for p in each),
            pending=sum(p.pending for p in each),
            dead_letter_length=sum(p.dead_letter_length for p in each),
            # Every worker is a consumer of every partition's group.
            consumers=max(p.consumers for p in each),
            oldest_undelivered_age=max(p.oldest_undelivered_age for p in each),
            oldest_pending_age=max(p.oldest_pending_age for p in each),
            retry_size=sum(p.retry_size for p in each),
            webhook_deliveries_pending=sum(p.webhook_deliveries_pending for p in each),
            webhook_dead_letter_length=sum(p.webhook_dead_letter_length for p in each),
            lanes=tuple(
                LaneStats(
                    priority=lane.priority,
                    depth=sum(p.lanes[i].depth for p in each),
                    oldest_age=max(p.lanes[i].oldest_age for p in each),
                )
                for i, lane in enumerate(each[0].lanes)
            ),
            partitions=each,
        )

    @_translated
    async def check_writable(self) -> None:
        # A write, not a PING: a server that answers but refuses writes (OOM, READONLY,
        # MISCONF, ...) can take neither a submit nor an outcome, so it is not ready. Every
        # partition's, as on a cluster they sit on different masters.
        if len(self.partitions) == 1:
            await self.redis.set(self.keys.probe, "1", px=10_000)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in self.partitions.all:
                pipe.set(keys.probe, "1", px=10_000)
            await self._execute(pipe)

    @_translated
    async def record_layout(self) -> str | None:
        # One SET GET: the layout is recorded and the one before it read in one round trip.
        # The last process to start wins, so after a change of layout made on purpose only
        # the first process of the new one warns; while processes of two layouts keep
        # starting, each start of either side warns.
        cluster = isinstance(self.redis, RedisCluster)
        ours = layout(self.settings, cluster=cluster)
        key = Keys.from_settings(self.settings, cluster=cluster).layout
        reply = await self.redis.set(key, ours, get=True)
        if reply is None:
            return None
        before = reply.decode() if isinstance(reply, bytes) else str(reply)
        if before == ours:
            return None
        return (
            f"the queue {self.settings.queue_key!r} was last used laid out as {before} (Redis "
            f"key {key!r}), and this process lays it out as {ours} "
            f"({layout_reasons(self.settings, cluster=cluster)}). If an api or worker of the "
            "other layout still runs, the two use different keys, and tasks submitted on one "
            "side are never run by the other: give every api and worker the same "
            "QUEUE_PARTITIONS, PRIORITY_LANES and per-key quotas (or pin QUEUE_PARTITIONS). "
            "After a change of layout made on purpose, with the old processes gone and their "
            "queue drained, this is expected once."
        )

    @_translated
    async def writable_partitions(self) -> list[QueueState | None]:
        # With DURABLE_ACKS the probe waits for its confirmation, as an outcome would: a
        # partition whose master has no replica takes the write but cannot confirm it.
        calls = [([keys.probe], [10_000]) for keys in self.partitions.all]
        try:
            replies = await self._call_each_isolated(self._probe_script, calls, durable=True)
        except (RedisError, RedisClusterException) as error:  # a single server's
            translated = queue_error(error)
            if translated is None:
                raise
            return [translated.state] * len(calls)
        except QueueUnavailable as error:
            return [error.state] * len(calls)
        return [r.state if isinstance(r, QueueUnavailable) else None for r in replies]

    @property
    def partition_count(self) -> int:
        return len(self.partitions)

    def partition_of(self, task_id: str) -> int | None:
        keys = self.partitions.of_task(task_id)
        return None if keys is None else keys.index


# How long an api's start waits for Redis to answer before it goes on without the record.
LAYOUT_CHECK_SECONDS = 3.0


def record_layout_at_start(settings: Settings) -> None:
    """Entry-point helper for the api: record the queue's layout, and log an error when it
    differs from the one recorded before (see RedisTaskQueue.record_layout). It never stops
    the start: the record outlives the processes that made it, so a stale one is no proof
    that processes of another layout still run. The api starts while Redis is down (it
    answers 503 until Redis is back): a Redis that does not answer within
    LAYOUT_CHECK_SECONDS is left to the workers, which wait for Redis and record theirs.
    """

    async def record() -> str | None:
        queue = RedisTaskQueue(connect(settings), settings)
        try:
            return await asyncio.wait_for(queue.record_layout(), LAYOUT_CHECK_SECONDS)
        finally:
            await queue.close()

    try:
        warning = asyncio.run(record())
    except (QueueUnavailable, TimeoutError) as error:
        log.warning("the queue's layout could not be recorded at start (%s)",
                    error or f"no answer within {LAYOUT_CHECK_SECONDS:g}s")  # fmt: skip
        return
    if warning is not None:
        log.error("%s", warning)
