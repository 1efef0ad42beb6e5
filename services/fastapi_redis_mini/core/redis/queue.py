"""The Redis Streams implementation of TaskQueue: the RedisTaskQueue class.

Every multi-step change of state is one Lua script (see lua/), so it is atomic, and batches
travel in one round trip: a worker's deliveries and outcomes, and the api's submits and reads
that meet in one process (see batching.Coalescer).

This module owns the class, the `_translated` decorator its methods wear, and the parsing of
its scripts' replies. The rest lives beside it, each module saying what it owns: _errors.py
(what a redis-py error means for the queue), _connect.py (the client and cluster detection),
_durability.py (DURABLE_ACKS), _routing.py (how a script call reaches its slot's node, a base
of the class), _fairness.py (reading every partition in turn), _avoidance.py (where an unkeyed
submit goes while its partition cannot confirm) and _subscription.py (pub/sub).
Their public names are imported here too, where they were before the split.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Sequence,
)
from dataclasses import dataclass
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import orjson
from redis.asyncio import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from ..batching import Coalescer
from ..models import PRIORITIES, Priority, Task, TaskCreate, TaskStatus
from ..queue import (
    CancelOutcome,
    DeadLetter,
    Delivery,
    Finish,
    FinishVerdict,
    Job,
    LaneStats,
    Outcome,
    PartitionsUnavailable,
    QueueState,
    QueueStats,
    QueueUnavailable,
    Report,
    StartVerdict,
    SubmitOutcome,
    SubmitQuota,
    Submitted,
    TaskEvent,
    TaskEvents,
    WebhookMessage,
    WebhookVerdict,
)
from ..settings import Settings
from ._avoidance import AvoidedPartitions
from ._connect import Client, connect, is_cluster
from ._durability import check_durable_acks, durable_wait, exit_unless_durable_acks
from ._errors import queue_error, torn_down
from ._fairness import fair_share
from ._routing import SlotRouting
from ._subscription import Subscription
from ._webhook_messages import completed_url, decode, encode
from .keys import Keys, Partitions

__all__ = [
    "Client",
    "RedisTaskQueue",
    "check_durable_acks",
    "connect",
    "exit_unless_durable_acks",
    "is_cluster",
    "new_task_id",
    "queue_error",
    "torn_down",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _translated(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Raise the queue's own errors from a method, so no caller needs to know redis-py's."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            queue = args[0] if args else None
            if isinstance(queue, RedisTaskQueue) and queue.slots_unknown:
                await queue.learn_slots()
            return await method(*args, **kwargs)
        except (RedisError, RedisClusterException) as error:
            translated = queue_error(error)
            if translated is None:
                raise
            raise translated from error
        except (AttributeError, RuntimeError) as error:
            if not torn_down(error):
                raise
            detail = f"a connection closed during the call ({type(error).__name__}: {error})"
            raise QueueUnavailable(QueueState.UNREACHABLE, detail) from error

    return call


_IDLE_CONSUMER_MS = 3_600_000
# trim_turns.lua looks at about this many lane-turns fields per partition and trim (every
# 10 s), so one call's work is bounded; a hash needs more than one sweep only while more keys
# than that have tasks waiting, or once after an upgrade from a version that kept every key.
_TURNS_TRIMMED_PER_CALL = 1000
# finish.lua counts outcomes in ten-second buckets, kept a quarter of an hour: the console
# charts the last five minutes of them.
COUNTS_BUCKET_SECONDS = 10
COUNTS_KEPT_SECONDS = 900


def new_task_id() -> str:
    """122 random bits (UUID4), so task ids cannot be guessed."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class _NewTask:
    task_id: str
    request: str
    signature: str
    scope: str
    idempotency_key: str | None
    traceparent: str
    replacing: str | None
    priority: Priority
    due_at: float  # Unix seconds; 0 when due now
    deadline_at: float  # Unix seconds; 0 for none
    single_flight: bool
    replacing_in_flight: str | None
    webhook: str | None = None  # where a cache hit's `completed` delivery goes, if one is asked for


def _quota(settings: Settings, tokens: int, reset_ms: int) -> SubmitQuota:
    return SubmitQuota(
        limit=settings.submit_burst_per_key,
        window_seconds=math.ceil(settings.submit_burst_per_key / settings.submit_rate_per_key),
        remaining=tokens,
        reset_seconds=math.ceil(reset_ms / 1000),
    )


def _age(entry_id: str, now_ms: int) -> float:
    """Seconds since a stream entry was added (its id starts with that time in ms)."""
    if not entry_id:
        return 0.0
    return max(0, now_ms - int(entry_id.split("-", 1)[0])) / 1000


def _load_script(redis: Client, name: str) -> AsyncScript:
    source = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
    return redis.register_script(source)


class RedisTaskQueue(SlotRouting):
    """Tasks in `task:{id}` hashes, results in `cache:{signature}`, work in a consumer group.

    The keys form QUEUE_PARTITIONS partitions (see keys.Partitions), each with its own stream
    under its own hash tag: every script call touches the keys of one partition, and a call
    that concerns several partitions becomes one script call per partition, pipelined (a
    cluster client sends each node its share of the pipeline at once).
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

    async def submit(
        self,
        request: TaskCreate,
        *,
        signature: str,
        scope: str = "",
        idempotency_key: str | None = None,
        traceparent: str = "",
        replacing: str | None = None,
        due_at: float = 0.0,
        replacing_in_flight: str | None = None,
    ) -> Submitted:
        home = self.partitions.of_submit(signature, scope, idempotency_key)
        # A keyed submit stays in its home partition, so that a key names one task. An
        # unkeyed one may be stored anywhere: while its own partition cannot confirm, it goes
        # to a partition of another master (see _avoidance.py).
        reroutable = idempotency_key is None and len(self.partitions) > 1
        keys = home
        if reroutable and self._avoided.avoids(home.index):
            keys = self._elsewhere(home, signature) or home
        tried: set[int] = set()
        deadline = request.deadline_seconds
        while True:
            task = _NewTask(
                task_id=self.partitions.new_task_id(keys),
                request=request.canonical.decode(),
                signature=signature,
                scope=scope,
                idempotency_key=idempotency_key,
                traceparent=traceparent,
                replacing=replacing,
                priority=request.lane,
                due_at=due_at,
                deadline_at=(due_at or time.time()) + deadline if deadline else 0.0,
                # A delayed request is a promise about later, not a second copy of one in
                # flight.
                single_flight=self.settings.single_flight and not due_at,
                replacing_in_flight=replacing_in_flight,
                webhook=completed_url(request),
            )
            try:
                return await self._submit_coalescers[keys.index](task)
            except QueueUnavailable as error:
                tried.add(keys.index)
                if not reroutable:
                    raise
                if self._avoided.avoid(keys.index):
                    log.warning(
                        "partition %d cannot confirm submits (%s): unkeyed submits go to "
                        "other partitions for %gs", keys.index, error, self._avoided.seconds,
                    )  # fmt: skip
                other = self._elsewhere(keys, signature, tried)
                if other is None or len(tried) >= 2:
                    raise
                keys = other

    def _elsewhere(self, keys: Keys, signature: str, tried: Collection[int] = ()) -> Keys | None:
        """A partition to take an unkeyed submit that `keys`' partition cannot confirm: one on
        another master, not avoided, chosen by the signature so that retries spread."""
        cluster = self.redis
        if not isinstance(cluster, RedisCluster):
            return None  # every partition lives on the one server

        def master_of(index: int) -> str | None:
            try:
                node = cluster.get_node_from_key(self.partitions.all[index].stream)
            except (RedisError, RedisClusterException):
                return None
            return None if node is None else str(node.name)

        index = self._avoided.alternative(
            keys.index, signature, len(self.partitions), master_of, tried
        )
        return None if index is None else self.partitions.all[index]

    # Translated once per batch rather than once per submit: the coalescer raises the batch's
    # error in every submit of it.
    @_translated
    async def _submit_many(self, partition: Keys, tasks: Sequence[_NewTask]) -> list[Submitted]:
        s = self.settings
        # Quotas are per API key; without API_KEYS every client shares scope "" and its quota.
        quotas = s.quotas
        lanes = s.priority_lanes
        keys = [partition.stream, partition.retries, partition.lane_turns, *partition.lanes]
        batch = []
        for t in tasks:
            keys += (
                partition.task(t.task_id),
                partition.cache(t.signature, t.scope),
                partition.idempotency(t.idempotency_key or "", t.scope),
                partition.inflight(t.signature, t.scope),
            )
            if quotas:
                keys += (
                    partition.submit_quota(t.scope),
                    partition.unfinished(t.scope),
                    partition.stored_bytes(t.scope),
                )
            keyed: int | str = 0 if t.idempotency_key is None else (t.replacing or 1)
            task: dict[str, Any] = {
                "task_id": t.task_id,
                "request": t.request,
                "signature": t.signature,
                "scope": t.scope,
                "trace": t.traceparent,
                "idempotency": keyed,
            }
            # Scheduling fields travel only when set: the script reads a missing one as its
            # default, and the batch's JSON stays as small as before for plain submits.
            if t.single_flight:
                task["inflight"] = t.replacing_in_flight or 1
            if lanes:
                task["lane"] = PRIORITIES.index(t.priority) + 1
                task["turn_of"] = t.scope if s.fair_share else ""
            if t.priority is not Priority.NORMAL:
                task["priority"] = t.priority.value
            if t.due_at:
                task["due"] = t.due_at
            if t.deadline_at:
                task["deadline"] = t.deadline_at
            if t.webhook:
                task["webhook"] = t.webhook
            batch.append(task)
        if s.recent_tasks:
            keys.append(partition.recent)
        # Named only when a submit of the batch has a webhook: the others pay nothing for it.
        webhooks = any(t.webhook for t in tasks)
        if webhooks:
            keys += (partition.webhooks_due, partition.webhook_messages)
        reply = await self._call(
            self._submit_script,
            keys,
            args=[repr(time.time()), s.cache_ttl, s.result_expiry, s.idempotency_ttl,
                  repr(s.submit_rate_per_key), s.submit_burst_per_key, s.max_unfinished_per_key,
                  int(quotas), orjson.dumps(batch),
                  partition.work if self._announces_work else "", self._publish,
                  s.max_stored_bytes_per_key, s.recent_tasks, int(webhooks)],
        )  # fmt: skip
        submitted = []
        for answer in orjson.loads(reply):
            outcome = SubmitOutcome(answer["outcome"])
            tokens = answer["tokens"]
            submitted.append(
                Submitted(
                    task_id=answer["task_id"],
                    outcome=outcome,
                    result=orjson.loads(answer["result"])
                    if outcome is SubmitOutcome.CACHED
                    else None,
                    quota=_quota(s, tokens, answer["reset_ms"]) if tokens >= 0 else None,
                    retry_after=math.ceil(answer["reset_ms"] / 1000),
                )
            )
        return submitted

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

    # -- the worker side

    @_translated
    async def ensure_group(self) -> None:
        for keys in self.partitions.all:
            try:
                await self.redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    @_translated
    async def read(
        self, consumer: str, count: int, block_ms: int, *, avoid: Collection[int] = ()
    ) -> list[Delivery]:
        readable = [keys for keys in self.partitions.all if keys.index not in avoid]
        if not readable:
            await asyncio.sleep(block_ms / 1000)
            return []
        if len(self.partitions) == 1 and not self.settings.priority_lanes:
            return await self._read_blocking(consumer, count, block_ms)
        # A blocking read cannot wait on streams of several slots, so a worker reads every
        # partition without blocking and, finding nothing, sleeps until a submit announces new
        # entries (or block_ms passes: the announcement is only the fast path). The flag is
        # cleared before the reads, so an announcement that comes during them is not missed.
        await self._work_announced.start()
        self._work_announced.clear()
        deliveries = await self._read_fairly(consumer, count, readable)
        if deliveries:
            return deliveries
        await self._work_announced.wait(block_ms / 1000)
        return await self._read_fairly(consumer, count, readable)

    async def _read_blocking(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        try:
            reply: Any = await self.redis.xreadgroup(
                self.keys.group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            # The group vanished (a Redis restart without persistence): make it again.
            await self.ensure_group()
            return []
        if not reply:
            return []
        return _deliveries(reply[0][1])

    async def _read_fairly(
        self, consumer: str, count: int, partitions: Sequence[Keys]
    ) -> list[Delivery]:
        """A fair read of `partitions`; one that cannot be read gives nothing this time, and
        only when none could be read does the read fail."""
        failed: dict[int, QueueUnavailable] = {}

        async def read_group(shares: list[tuple[Keys, int]]) -> list[list[Delivery]]:
            if self.settings.priority_lanes:
                guard = self.settings.priority_starvation_guard
                replies = await self._call_each_isolated(
                    self._dispatch_script,
                    [
                        ([k.stream, k.lane_turns, *k.lanes], [k.group, consumer, share, guard])
                        for k, share in shares
                    ],
                )
            else:
                replies = await self._call_each_isolated(
                    self._read_group_script,
                    [([keys.stream], [keys.group, consumer, share]) for keys, share in shares],
                )
            found: list[list[Delivery]] = []
            for (keys, _), r in zip(shares, replies, strict=True):
                if isinstance(r, QueueUnavailable):
                    failed[keys.index] = r
                    found.append([])
                    continue
                found.append(
                    [Delivery(entry_id=r[i], task_id=r[i + 1]) for i in range(0, len(r), 2)]
                )
            return found

        deliveries, self._read_turn = await fair_share(
            partitions, self._read_turn % len(partitions), count, read_group
        )
        if not deliveries and len(failed) == len(partitions):
            raise PartitionsUnavailable(failed, [])
        return deliveries

    @_translated
    async def claim_idle(
        self, consumer: str, count: int, *, avoid: Collection[int] = ()
    ) -> list[Delivery]:
        claimable = [keys for keys in self.partitions.all if keys.index not in avoid]
        if not claimable:
            return []
        min_idle_ms = int(self.settings.claim_idle * 1000)

        async def claim(shares: list[tuple[Keys, int]]) -> list[list[Delivery]]:
            # The scan goes on where the last one stopped, so idle entries far down the
            # pending list are reached too instead of waiting behind the first live ones.
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, share in shares:
                    cursor = self._claim_cursors.get((consumer, keys.index), "0-0")
                    pipe.xautoclaim(keys.stream, keys.group, consumer, min_idle_ms, cursor,
                                    count=share)  # fmt: skip
                replies = await self._execute(pipe)
            claimed = []
            for (keys, _), reply in zip(shares, replies, strict=True):
                self._claim_cursors[(consumer, keys.index)] = reply[0]
                claimed.append(_deliveries(reply[1]))
            return claimed

        deliveries, self._claim_turn = await fair_share(
            claimable, self._claim_turn % len(claimable), count, claim
        )
        return deliveries

    @_translated
    async def start(
        self, consumer: str, deliveries: Sequence[Delivery], *, alone: bool = False
    ) -> list[Job]:
        if not deliveries:
            return []
        now = time.time()
        groups = self._by_partition([d.task_id for d in deliveries])
        calls = []
        for index, positions in groups.items():
            keys = self.partitions.all[index]
            batch = [deliveries[i] for i in positions]
            calls.append((
                [keys.stream, keys.dead_letter, *(keys.task(d.task_id) for d in batch),
                 keys.webhooks_due, keys.webhook_messages],
                # The batch travels as one JSON argument: encoding one string is far cheaper
                # for the client than encoding hundreds of separate arguments.
                [keys.group, consumer, repr(now), self.settings.max_deliveries, int(alone),
                 orjson.dumps([(d.entry_id, d.task_id) for d in batch]),
                 self.settings.result_expiry, keys.events, self.settings.dead_letter_maxlen,
                 self._publish, keys.reports],
            ))  # fmt: skip
        replies = await self._call_each_isolated(self._start_script, calls)
        rows, failed = _spread(groups, replies, len(deliveries), {"verdict": "skip"}, orjson.loads)
        jobs: list[Job | None] = []
        ended: list[Job] = []
        for d, row in zip(deliveries, rows, strict=True):
            if row is None:  # its partition failed: not started, to be tried again
                jobs.append(None)
                continue
            verdict = StartVerdict(row["verdict"])
            job = Job(entry_id=d.entry_id, task_id=d.task_id, verdict=verdict, started_at=now)
            if verdict in (StartVerdict.DEAD, StartVerdict.CANCELLED, StartVerdict.EXPIRED):
                job.scope = row["scope"]
                ended.append(job)
            if verdict is StartVerdict.RUN:
                request = orjson.loads(row["request"])
                job.prompt = request["prompt"]
                job.params = request["params"]
                job.signature = row["signature"]
                job.scope = row["scope"]
                job.traceparent = row["traceparent"]
                job.created_at = float(row["created_at"])
                job.attempts = int(row["attempts"])
                if "webhook" in request:
                    job.webhook = request["webhook"]
                    job.webhook_events = frozenset(request["webhook_events"] or ("completed",))
            jobs.append(job)
        if ended and self.settings.max_unfinished_per_key:
            await self._forget_unfinished(ended)
        if failed:
            raise PartitionsUnavailable(failed, jobs)
        return [job for job in jobs if job is not None]

    async def _forget_unfinished(self, jobs: Sequence[Job]) -> None:
        """Take tasks start.lua ended off their API key's set of unfinished tasks.

        start.lua cannot: the set's name follows from the task's scope, which the script only
        learns by reading the task. Best effort, and rare (a dead letter, or a cancel that
        outlived its worker): an entry left behind still drops out at RESULT_EXPIRY. (Quotas
        come with a single partition, whose keys these are.)
        """
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.zrem(self.keys.unfinished(job.scope), job.task_id)
                await self._execute(pipe)
        except RedisError as error:
            log.warning("could not update the unfinished-task counts: %s", error)

    @_translated
    async def finish(self, consumer: str, finishes: Sequence[Finish]) -> list[FinishVerdict]:
        if not finishes:
            return []
        groups = self._by_partition([f.job.task_id for f in finishes])
        calls = []
        now = repr(time.time())
        for index, positions in groups.items():
            p = self.partitions.all[index]
            keys = [p.stream, p.retries]
            batch: list[tuple[Any, ...]] = []
            webhooks = False
            for f in (finishes[i] for i in positions):
                job = f.job
                keys += (p.task(job.task_id), p.cache(job.signature, job.scope),
                         p.unfinished(job.scope))  # fmt: skip
                payload = f.result.decode() if f.outcome is Outcome.DONE else (f.error or "")
                item: tuple[Any, ...] = (job.entry_id, job.task_id, f.outcome.value, payload,
                                         f.due_at)  # fmt: skip
                if f.webhook is not None:
                    webhooks = True
                    item += (f.webhook.message_id, encode(f.webhook).decode())
                batch.append(item)
            if self.settings.recent_tasks:
                keys += (p.finished("done"), p.finished("failed"), p.finished("cancelled"),
                         p.counts(int(float(now)) // COUNTS_BUCKET_SECONDS))  # fmt: skip
            # Named only when an outcome of the batch has a delivery: a batch without webhooks
            # costs what it did before.
            if webhooks:
                keys += (p.webhooks_due, p.webhook_messages)
            calls.append((
                keys,
                [p.group, consumer, now, self.settings.cache_ttl, p.events,
                 self.settings.result_expiry, orjson.dumps(batch), self._publish,
                 self.settings.recent_tasks, COUNTS_KEPT_SECONDS, int(webhooks)],
            ))  # fmt: skip
        replies = await self._call_each_isolated(self._finish_script, calls, durable=True)
        verdicts, failed = _spread(
            groups, replies, len(finishes), FinishVerdict.LOST,
            lambda reply: [FinishVerdict(v) for v in reply],
        )  # fmt: skip
        if failed:
            raise PartitionsUnavailable(failed, verdicts)
        return [v for v in verdicts if v is not None]

    @_translated
    async def keep_alive(self, consumer: str, jobs: Sequence[Job]) -> list[str]:
        if not jobs:
            return []
        groups = self._by_partition([j.task_id for j in jobs])
        calls = []
        for index, positions in groups.items():
            keys = self.partitions.all[index]
            calls.append((
                [keys.stream, *(keys.task(jobs[i].task_id) for i in positions)],
                [keys.group, consumer, *(jobs[i].entry_id for i in positions)],
            ))  # fmt: skip
        replies = await self._call_each_isolated(self._keep_alive_script, calls)
        answers, failed = _spread(groups, replies, len(jobs), "lost", lambda reply: reply)
        if failed:
            raise PartitionsUnavailable(failed, answers)
        return [a for a in answers if a is not None]

    @_translated
    async def report(self, consumer: str, task_id: str, reports: Sequence[Report]) -> bool:
        partition = self.partitions.of_task(task_id)
        if partition is None or not reports:
            return False
        settings = self.settings
        reply = await self._report_script(
            keys=[partition.task(task_id), partition.task_events(task_id)],
            # The event stream outlives the run by RESULT_EXPIRY, as the task does, plus the
            # longest a run may go on after its last report.
            args=[consumer, settings.events_maxlen,
                  settings.result_expiry + math.ceil(settings.task_timeout),
                  partition.reports, self._publish, task_id,
                  orjson.dumps([(r.kind, repr(r.fraction), r.text) for r in reports])],
        )  # fmt: skip
        return bool(reply == "written")

    @_translated
    async def enqueue_webhooks(self, messages: Sequence[WebhookMessage]) -> None:
        if not messages:
            return
        groups = self._by_partition([m.task_id for m in messages])
        now = repr(time.time())
        calls = []
        for index, positions in groups.items():
            keys = self.partitions.all[index]
            args: list[Any] = [now]
            for i in positions:
                args += (messages[i].message_id, encode(messages[i]))
            calls.append(([keys.webhooks_due, keys.webhook_messages], args))
        await self._call_each(self._webhook_enqueue_script, calls)

    @_translated
    async def claim_webhooks(self, count: int, lease: float) -> list[WebhookMessage]:
        # Every partition is asked for a share, starting at a turn that moves on, so one
        # partition's backlog does not keep the others' deliveries waiting.
        parts = self.partitions.all
        turn = self._webhook_turn % len(parts)
        self._webhook_turn += 1
        ordered = parts[turn:] + parts[:turn]
        if len(parts) <= count:
            shares = [(keys, count // len(parts)) for keys in ordered]
        else:
            shares = [(keys, 1) for keys in ordered[:count]]
        now = repr(time.time())
        calls = [([k.webhooks_due, k.webhook_messages], [now, lease, n]) for k, n in shares]
        replies = await self._call_each_isolated(self._webhook_claim_script, calls)
        messages = []
        for (keys, _), reply in zip(shares, replies, strict=True):
            if isinstance(reply, QueueUnavailable):
                continue  # that partition's deliveries wait; the others' are sent
            for i in range(0, len(reply), 3):
                message = decode(reply[i], int(reply[i + 1]), _text(reply[i + 2]))
                message.partition = keys.index
                messages.append(message)
        return messages

    @_translated
    async def settle_webhook(
        self, message: WebhookMessage, verdict: WebhookVerdict, *, due_at: float = 0.0
    ) -> bool:
        keys = self.partitions.all[message.partition]
        reply = await self._webhook_settle_script(
            keys=[keys.webhooks_due, keys.webhook_messages, keys.webhooks_dead],
            args=[message.message_id, message.attempt, verdict.value, repr(due_at),
                  message.last_error[:500], repr(time.time()), self.settings.dead_letter_maxlen],
        )  # fmt: skip
        return _text(reply) == "settled"

    @_translated
    async def webhook_dead_letters(self, count: int) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        for keys in self.partitions.all:
            entries: list[tuple[str, dict[str, str]]] = await self.redis.xrevrange(  # type: ignore[assignment]
                keys.webhooks_dead, count=count
            )
            letters += [DeadLetter(entry_id, f.get("task_id", ""), f) for entry_id, f in entries]
        return letters

    @_translated
    async def promote_due_retries(self, limit: int) -> int:
        # Two round trips, once per maintenance pass: the script must name each task's key,
        # so the due ids are read first. The script checks again that each is still due.
        now = repr(time.time())
        parts = self.partitions.all
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in parts:
                pipe.zrangebyscore(keys.retries, "-inf", now, start=0, num=limit)
            due_per_partition: list[list[str]] = await self._execute(pipe)
        calls = [
            ([keys.retries, keys.stream, *map(keys.task, due)],
             [now, keys.work if self._announces_work else "", self._publish, *due])
            for keys, due in zip(parts, due_per_partition, strict=True)
            if due
        ]  # fmt: skip
        if not calls:
            return 0
        return sum(int(n) for n in await self._call_each(self._promote_script, calls))

    @_translated
    async def trim(self) -> int:
        parts = self.partitions.all
        removed = await self._call_each(self._trim_script, [([k.stream], []) for k in parts])
        await self._call_each(
            self._prune_script, [([k.stream], [k.group, "", _IDLE_CONSUMER_MS]) for k in parts]
        )
        await self._call_each(
            self._trim_turns_script, [([k.lane_turns], [_TURNS_TRIMMED_PER_CALL]) for k in parts]
        )
        return sum(int(n) for n in removed)

    @_translated
    async def leave(self, consumer: str) -> None:
        await self._call_each(
            self._prune_script,
            [([k.stream], [k.group, consumer, _IDLE_CONSUMER_MS]) for k in self.partitions.all],
        )

    # -- operators

    def _dead_letter_id(self, keys: Keys, entry_id: str) -> str:
        """An entry id of a dead-letter stream, naming its partition when there are several."""
        return entry_id if len(self.partitions) == 1 else f"{keys.index}/{entry_id}"

    @_translated
    async def dead_letters(self, count: int) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        for keys in self.partitions.all:
            if len(letters) >= count:
                break
            entries: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
                keys.dead_letter, count=count - len(letters)
            )
            letters += [
                DeadLetter(
                    entry_id=self._dead_letter_id(keys, entry_id),
                    task_id=fields.get("task_id", ""),
                    fields=fields,
                )
                for entry_id, fields in entries
            ]
        return letters

    @_translated
    async def replay_dead_letters(self, entry_ids: Sequence[str]) -> int:
        # "<partition>/<entry id>" with several partitions (see _dead_letter_id).
        several = len(self.partitions) > 1
        per_partition: dict[int, list[str]] = {}
        for entry_id in entry_ids:
            named, _, stream_id = entry_id.rpartition("/")
            if not several and not named:
                per_partition.setdefault(0, []).append(stream_id)
            elif several and named.isdigit() and int(named) < len(self.partitions):
                per_partition.setdefault(int(named), []).append(stream_id)
        replayed = 0
        for index, stream_ids in per_partition.items():
            replayed += await self._replay(self.partitions.all[index], stream_ids)
        return replayed

    async def _replay(self, keys: Keys, entry_ids: Sequence[str]) -> int:
        found = []
        for entry_id in entry_ids:
            entries: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
                keys.dead_letter, entry_id, entry_id
            )
            if entries:
                found.append((entry_id, entries[0][1].get("task_id", "")))
        if not found:
            return 0
        return int(
            await self._replay_script(
                keys=[
                    keys.dead_letter,
                    keys.stream,
                    *(keys.task(task_id) for _, task_id in found),
                ],
                args=[*(e for e, _ in found), *(t for _, t in found)],
            )
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _spread(
    groups: dict[int, list[int]],
    replies: Sequence[Any],
    size: int,
    fill: T,
    each: Callable[[Any], Sequence[T]],
) -> tuple[list[T | None], dict[int, QueueUnavailable]]:
    """Per-partition replies put back in the order of the `size` items they answer (`each`
    turns one reply into its items' answers; `fill` answers an item of no partition), with
    None for the items of a partition whose call failed, and those partitions' errors."""
    answers: list[T | None] = [fill] * size
    failed: dict[int, QueueUnavailable] = {}
    for (index, positions), reply in zip(groups.items(), replies, strict=True):
        if isinstance(reply, QueueUnavailable):
            failed[index] = reply
            for position in positions:
                answers[position] = None
            continue
        for position, answer in zip(positions, each(reply), strict=True):
            answers[position] = answer
    return answers, failed


def _partition_stats(keys: Keys, reply: str) -> QueueStats:
    stats = orjson.loads(reply)
    length, now_ms = int(stats["stream_length"]), int(stats["now_ms"])
    return QueueStats(
        stream=keys.stream,
        group=keys.group,
        stream_length=length,
        # Lag is undefined after deletions past the group's position; the stream length is
        # then the safe upper bound.
        lag=int(stats["lag"]) if int(stats["lag"]) >= 0 else length,
        pending=int(stats["pending"]) if stats["group_found"] else 0,
        dead_letter_length=int(stats["dead_letter_length"]),
        consumers=int(stats["consumers"]),
        oldest_undelivered_age=_age(stats["oldest_undelivered"], now_ms),
        oldest_pending_age=_age(stats["oldest_pending"], now_ms),
        retry_size=int(stats["retry_size"]),
        webhook_deliveries_pending=int(stats["webhooks_pending"]),
        webhook_dead_letter_length=int(stats["webhooks_dead"]),
        lanes=tuple(
            LaneStats(
                priority=priority.value,
                depth=int(lane["depth"]),
                oldest_age=max(0, now_ms - int(lane["oldest_queued_ms"])) / 1000
                if int(lane["depth"])
                else 0.0,
            )
            for priority, lane in zip(PRIORITIES, stats["lanes"], strict=True)
        ),
        partition=keys.index,
    )


def _deliveries(entries: Sequence[Any]) -> list[Delivery]:
    # An entry trimmed or deleted after delivery comes back without fields; it has no task.
    return [
        Delivery(entry_id=entry_id, task_id=fields["task_id"])
        for entry_id, fields in entries
        if fields and "task_id" in fields
    ]
