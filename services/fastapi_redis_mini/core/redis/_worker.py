"""The worker side of RedisTaskQueue: taking tasks, running them to an outcome, and upkeep.

Owns WorkerSide, a base of RedisTaskQueue: the consumer groups (ensure_group); reading new
entries (read: one blocking XREADGROUP with a single partition and no lanes, else a fair read
of every partition that sleeps on the work channel) and claiming idle ones (claim_idle), or
its own whose reply it never heard (claim_unheard);
starting, finishing and keeping alive the tasks they name (start, finish, keep_alive) and a
run's progress reports (report); and the worker's upkeep: due retries back in the streams
(promote_due_retries), the streams trimmed and idle consumers pruned (trim), and a consumer
leaving (leave). Also the outcome counts' buckets finish.lua keeps (COUNTS_BUCKET_SECONDS,
COUNTS_KEPT_SECONDS), which the console reads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Collection, Sequence
from typing import Any

import orjson
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from ..queue import (
    ENDED_AT_START,
    Delivery,
    Finish,
    FinishVerdict,
    Job,
    Outcome,
    PartitionsUnavailable,
    QueueUnavailable,
    Report,
    StartVerdict,
)
from ._base import QueueBase, _translated
from ._fairness import fair_share
from ._replies import _deliveries, _spread
from ._subscription import Subscription
from ._webhook_messages import encode
from .keys import Keys

log = logging.getLogger(__name__)

_IDLE_CONSUMER_MS = 3_600_000
# trim_turns.lua looks at about this many lane-turns fields per partition and trim (every
# 10 s), so one call's work is bounded; a hash needs more than one sweep only while more keys
# than that have tasks waiting, or once after an upgrade from a version that kept every key.
_TURNS_TRIMMED_PER_CALL = 1000
# finish.lua counts outcomes in ten-second buckets, kept a quarter of an hour: the console
# charts the last five minutes of them.
COUNTS_BUCKET_SECONDS = 10
COUNTS_KEPT_SECONDS = 900


class WorkerSide(QueueBase):
    """RedisTaskQueue's worker calls (a base class, never made on its own)."""

    # Set by RedisTaskQueue.__init__.
    _start_script: AsyncScript
    _finish_script: AsyncScript
    _keep_alive_script: AsyncScript
    _report_script: AsyncScript
    _read_group_script: AsyncScript
    _dispatch_script: AsyncScript
    _promote_script: AsyncScript
    _trim_script: AsyncScript
    _trim_turns_script: AsyncScript
    _prune_script: AsyncScript
    _work_announced: Subscription
    _claim_cursors: dict[tuple[str, int], str]
    _read_turn: int
    _claim_turn: int
    # Whether take() can read and start in one call: on a single server, with one partition
    # and no lanes. start.lua names the task keys it reads there without their being
    # declared, which a single server allows and a cluster's contract does not (every key a
    # script touches is among its KEYS: tests/core/test_lua_keys.py).
    takes: bool

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
                replies = await self._execute_on_groups(pipe)
            claimed: list[list[Delivery]] = []
            for (keys, _), reply in zip(shares, replies, strict=True):
                if reply is None:
                    self._claim_cursors.pop((consumer, keys.index), None)
                    claimed.append([])
                    continue
                self._claim_cursors[(consumer, keys.index)] = reply[0]
                claimed.append(_deliveries(reply[1]))
            return claimed

        deliveries, self._claim_turn = await fair_share(
            claimable, self._claim_turn % len(claimable), count, claim
        )
        return deliveries

    @_translated
    async def claim_unheard(
        self,
        consumer: str,
        held: Collection[str],
        min_idle: float,
        count: int,
        *,
        avoid: Collection[int] = (),
    ) -> list[Delivery]:
        """Entries pending for `consumer` itself, delivered once, idle at least `min_idle`
        seconds and not in `held` (entry ids): deliveries whose reply it never heard, because
        a read or take timed out after Redis had run it. Each is claimed again, which resets
        its idle time, so that its task starts now instead of after CLAIM_IDLE. An entry
        delivered more than once came from a claim (a suspect this worker left to others), and
        is left to go idle."""
        min_idle_ms = int(min_idle * 1000)
        partitions = [keys for keys in self.partitions.all if keys.index not in avoid]
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in partitions:
                pipe.xpending_range(keys.stream, keys.group, "-", "+", count,
                                    consumername=consumer, idle=min_idle_ms)  # fmt: skip
            pending = await self._execute_on_groups(pipe)
        unheard = [
            (keys, ids)
            for keys, entries in zip(partitions, pending, strict=True)
            if (
                ids := [
                    e["message_id"]
                    for e in entries or ()
                    if e["times_delivered"] == 1 and e["message_id"] not in held
                ]
            )
        ]
        if not unheard:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, ids in unheard:
                # Claimed only if still idle that long: one that another worker took over
                # meanwhile has been touched since, and stays its.
                pipe.xclaim(keys.stream, keys.group, consumer, min_idle_ms, ids)
            replies = await self._execute_on_groups(pipe)
        return [delivery for reply in replies for delivery in _deliveries(reply or ())]

    async def _execute_on_groups(self, pipe: Any) -> list[Any]:
        """Run a pipeline of commands on consumer groups. A group that vanished (a restart
        without persistence took its stream; the next read makes it again) holds nothing to
        claim: its reply is None, where redis-py would raise NOGROUP for the whole pipeline."""
        replies = await self._execute(pipe, raise_on_error=False)
        for i, reply in enumerate(replies):
            if isinstance(reply, ResponseError) and "NOGROUP" in str(reply):
                replies[i] = None
            elif isinstance(reply, Exception):
                raise reply
        return replies

    @_translated
    async def take(self, consumer: str, count: int) -> list[Job]:
        """Read up to `count` new entries and start their tasks, in one call (start.lua reads
        them itself): a worker's next batch starts in Redis while it runs the last one. Never
        blocks; nothing new gives []. Only where `takes` holds."""
        keys = self.keys
        now = time.time()
        reply = await self._start_script(
            keys=[keys.stream, keys.dead_letter, keys.webhooks_due, keys.webhook_messages],
            args=[keys.group, consumer, repr(now), self.settings.max_deliveries, 0, "[]",
                  self.settings.result_expiry, keys.events, self.settings.dead_letter_maxlen,
                  self._publish, keys.reports, count, keys.prefix],
        )  # fmt: skip
        rows = orjson.loads(reply)
        deliveries = [Delivery(entry_id=row["entry"], task_id=row["task_id"]) for row in rows]
        jobs = [self._job(d, row, now) for d, row in zip(deliveries, rows, strict=True)]
        ended = [job for job in jobs if job.verdict in ENDED_AT_START]
        if ended and self.settings.max_unfinished_per_key:
            await self._forget_unfinished(ended)
        return jobs

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
            job = self._job(d, row, now)
            if job.verdict in ENDED_AT_START:
                ended.append(job)
            jobs.append(job)
        if ended and self.settings.max_unfinished_per_key:
            await self._forget_unfinished(ended)
        if failed:
            raise PartitionsUnavailable(failed, jobs)
        return [job for job in jobs if job is not None]

    @staticmethod
    def _job(delivery: Delivery, row: dict[str, Any], now: float) -> Job:
        """The Job of one delivery, from start.lua's answer for it."""
        verdict = StartVerdict(row["verdict"])
        job = Job(
            entry_id=delivery.entry_id, task_id=delivery.task_id, verdict=verdict, started_at=now
        )
        if verdict in ENDED_AT_START:
            job.scope = row["scope"]
        elif verdict is StartVerdict.RUN:
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
        return job

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
