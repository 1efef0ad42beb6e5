"""The console's reads and actions on Redis: what the operator's pages show and change.

Every read is bounded by a count it is given or by the partitions' number: list heads
(LRANGE), stream ends (XREVRANGE ... COUNT), a page of a sorted set, one hash per task shown.
No KEYS and no SCAN. Actions reuse the queue's scripts (cancel, replay) and add retry.lua.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..queue import CancelOutcome, DeadLetter, QueueStats, TaskEvent
from .keys import Keys
from .queue import COUNTS_BUCKET_SECONDS, RedisTaskQueue, _load_script, _translated

# The fields a task list shows; the task page reads the whole hash.
_SUMMARY = ("status", "scope", "created_at", "finished_at", "attempts", "error")
# How far down a list a filter (by status or scope) looks, per partition.
FILTER_WINDOW = 200
# A worker's held entries shown, and the consumers shown per partition.
HELD_SHOWN = 10
CONSUMERS_SHOWN = 100
# A task page shows the newest reports of its event stream, at most this many.
EVENTS_SHOWN = 100


class RetryOutcome(StrEnum):
    QUEUED = "queued"
    NOT_FOUND = "not_found"
    NOT_FAILED = "not_failed"


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task's stored fields, by their stored names; `fields` is empty for none."""

    task_id: str
    fields: dict[str, str]

    @property
    def status(self) -> str:
        return self.fields.get("status", "")

    @property
    def scope(self) -> str:
        return self.fields.get("scope", "")


@dataclass(frozen=True, slots=True)
class Counts:
    """The outcomes written in one ten-second bucket starting at `start` (unix seconds)."""

    start: int
    done: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass(frozen=True, slots=True)
class Consumer:
    """A worker as its partition's consumer group sees it."""

    partition: int
    name: str
    pending: int  # entries delivered to it and not yet acknowledged
    idle_seconds: float  # since its last read or claim
    held: tuple[str, ...] = ()  # the task ids of the first HELD_SHOWN of those entries


@dataclass(frozen=True, slots=True)
class ScheduledTask:
    """A task in a partition's retry set: a delayed start (`run_at` set, never attempted) or a
    retry waiting out its backoff."""

    task_id: str
    partition: int
    due_at: float
    delayed: bool = False
    run_at: float | None = None


@dataclass(frozen=True, slots=True)
class TaskEventPage:
    """The newest reports of a task's event stream, oldest of them first, and how many the
    stream holds."""

    events: list[TaskEvent]
    total: int


@dataclass(frozen=True, slots=True)
class Overview:
    stats: QueueStats
    counts: list[Counts] = field(default_factory=list)
    now: float = 0.0


class ConsoleStore:
    """The console's view of a RedisTaskQueue: bounded reads, and the operator's actions."""

    def __init__(self, queue: RedisTaskQueue) -> None:
        self.queue = queue
        self.redis = queue.redis
        self.partitions = queue.partitions
        self._retry_script = _load_script(queue.redis, "retry")

    def _many(self) -> bool:
        return len(self.partitions) > 1

    def _split_dead_letter_id(self, entry_id: str) -> tuple[Keys, str] | None:
        """The partition and stream id a dead letter's id names, or None for a bad id."""
        named, _, stream_id = entry_id.rpartition("/")
        if not _is_stream_id(stream_id):
            return None
        if not self._many():
            return (self.partitions.all[0], stream_id) if not named else None
        if not named.isdigit() or int(named) >= len(self.partitions):
            return None
        return self.partitions.all[int(named)], stream_id

    # -- reads

    @_translated
    async def overview(self, buckets: int = 30) -> Overview:
        """The queue's figures, and the outcomes of the last `buckets` ten-second buckets."""
        stats = await self.queue.stats()
        now = time.time()
        newest = int(now) // COUNTS_BUCKET_SECONDS
        numbers = list(range(newest - buckets + 1, newest + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in self.partitions.all:
                for number in numbers:
                    pipe.hmget(keys.counts(number), "DONE", "FAILED", "CANCELLED")
            replies: list[list[str | None]] = await self.queue._execute(pipe)
        totals = [[0, 0, 0] for _ in numbers]
        for position, reply in enumerate(replies):
            row = totals[position % len(numbers)]
            for i, value in enumerate(reply):
                row[i] += int(value or 0)
        counts = [
            Counts(number * COUNTS_BUCKET_SECONDS, *row)
            for number, row in zip(numbers, totals, strict=True)
        ]
        return Overview(stats=stats, counts=counts, now=now)

    @_translated
    async def task(self, task_id: str) -> TaskRecord | None:
        """Any tenant's task, with every stored field; None when there is no such task."""
        keys = self.partitions.of_task(task_id)
        if keys is None:
            return None
        fields: dict[str, str] = await self.redis.hgetall(keys.task(task_id))  # type: ignore[assignment]
        return TaskRecord(task_id, fields) if fields else None

    @_translated
    async def recent(
        self, status: str | None = None, scope: str | None = None, limit: int = 50
    ) -> list[TaskRecord]:
        """The newest tasks, of one status and of one scope if given, newest first.

        PENDING and RUNNING come from the index of queued tasks; DONE, FAILED and CANCELLED
        from their own lists and that index. A filter looks FILTER_WINDOW ids down each list.
        """
        filtered = status is not None or scope is not None
        span = FILTER_WINDOW if filtered else limit
        source = {"DONE": "done", "FAILED": "failed", "CANCELLED": "cancelled"}.get(status or "")
        # A final status reads its own list and the queued-task index too: a task cancelled
        # while PENDING (cancel.lua) or dead-lettered (start.lua) ended outside finish.lua.
        lists = [
            (keys, name)
            for keys in self.partitions.all
            for name in ((keys.finished(source), keys.recent) if source else (keys.recent,))
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, name in lists:
                pipe.lrange(name, 0, span - 1)
            heads: list[list[str]] = await self.queue._execute(pipe)
        wanted: list[tuple[Keys, str]] = []
        seen: set[str] = set()
        for (keys, _), ids in zip(lists, heads, strict=True):
            for task_id in ids:
                # A task is in several lists, or twice in one when retried and failed again.
                if task_id not in seen:
                    seen.add(task_id)
                    wanted.append((keys, task_id))
        if not wanted:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, task_id in wanted:
                pipe.hmget(keys.task(task_id), *_SUMMARY)
            rows: list[list[str | None]] = await self.queue._execute(pipe)
        records = []
        for (_, task_id), row in zip(wanted, rows, strict=True):
            values = {name: value for name, value in zip(_SUMMARY, row, strict=True) if value}
            if "status" not in values:
                continue  # expired
            if status is not None and values["status"] != status:
                continue
            if scope is not None and values.get("scope", "") != scope:
                continue
            records.append(TaskRecord(task_id, values))
        newest = sorted(records, key=_created_at, reverse=True)
        return newest[:limit]

    @_translated
    async def workers(self) -> list[Consumer]:
        """Every partition's consumers (up to CONSUMERS_SHOWN each), busiest first."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in self.partitions.all:
                pipe.xinfo_consumers(keys.stream, keys.group)
            replies = await self.queue._execute(pipe, raise_on_error=False)
        found: list[tuple[Keys, dict[str, Any]]] = []
        for keys, reply in zip(self.partitions.all, replies, strict=True):
            if isinstance(reply, Exception):
                continue  # no stream or no group yet: no consumers
            found += [(keys, c) for c in reply[:CONSUMERS_SHOWN]]
        busy = [(keys, c) for keys, c in found if int(c["pending"])]
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, c in busy:
                pipe.xpending_range(keys.stream, keys.group, min="-", max="+",
                                    count=HELD_SHOWN, consumername=c["name"])  # fmt: skip
            pending: list[list[dict[str, Any]]] = await self.queue._execute(pipe) if busy else []
        held_ids: list[tuple[Keys, str]] = [
            (keys, str(entry["message_id"]))
            for (keys, _), entries in zip(busy, pending, strict=True)
            for entry in entries
        ]
        task_of: dict[tuple[int, str], str] = {}
        if held_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, entry_id in held_ids:
                    pipe.xrange(keys.stream, entry_id, entry_id)
                entries = await self.queue._execute(pipe)
            for (keys, entry_id), entry in zip(held_ids, entries, strict=True):
                if entry:
                    task_of[(keys.index, entry_id)] = entry[0][1].get("task_id", "")
        held = {
            (keys.index, c["name"]): tuple(
                task_of.get((keys.index, str(e["message_id"])), "") for e in entries
            )
            for (keys, c), entries in zip(busy, pending, strict=True)
        }
        consumers = [
            Consumer(
                partition=keys.index,
                name=str(c["name"]),
                pending=int(c["pending"]),
                idle_seconds=int(c["idle"]) / 1000,
                held=tuple(t for t in held.get((keys.index, c["name"]), ()) if t),
            )
            for keys, c in found
        ]
        return sorted(consumers, key=lambda c: (-c.pending, c.idle_seconds, c.name))

    @_translated
    async def events(self, task_id: str, limit: int = EVENTS_SHOWN) -> TaskEventPage:
        """The newest `limit` reports of a task's event stream (task:{id}:events)."""
        keys = self.partitions.of_task(task_id)
        if keys is None:
            return TaskEventPage([], 0)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrevrange(keys.task_events(task_id), count=limit)
            pipe.xlen(keys.task_events(task_id))
            newest, total = await self.queue._execute(pipe)
        return TaskEventPage([_event(entry_id, f) for entry_id, f in reversed(newest)], total)

    @_translated
    async def scheduled(self, limit: int = 50) -> list[ScheduledTask]:
        """Tasks waiting in the retry sets, soonest due first: delayed starts and retries."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in self.partitions.all:
                pipe.zrange(keys.retries, 0, limit - 1, withscores=True)
            replies: list[list[tuple[str, float]]] = await self.queue._execute(pipe)
        each = [
            [(keys, task_id, float(due)) for task_id, due in reply]
            for keys, reply in zip(self.partitions.all, replies, strict=True)
        ]
        soonest = list(heapq.merge(*each, key=lambda s: s[2]))[:limit]
        if not soonest:
            return []
        # A delayed task has run_at and no attempt yet; a retry has run at least once.
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, task_id, _ in soonest:
                pipe.hmget(keys.task(task_id), "run_at", "attempts")
            rows: list[list[str | None]] = await self.queue._execute(pipe)
        return [
            ScheduledTask(task_id, keys.index, due,
                          delayed=bool(run_at) and attempts in (None, "0"),
                          run_at=float(run_at) if run_at else None)
            for (keys, task_id, due), (run_at, attempts) in zip(soonest, rows, strict=True)
        ]  # fmt: skip

    @_translated
    async def dead_letters(self, limit: int = 50) -> list[DeadLetter]:
        """The newest dead letters of every partition, newest first."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in self.partitions.all:
                pipe.xrevrange(keys.dead_letter, count=limit)
            replies: list[list[tuple[str, dict[str, str]]]] = await self.queue._execute(pipe)
        letters = [
            (entry_id, DeadLetter(self._entry_name(keys, entry_id), f.get("task_id", ""), f))
            for keys, reply in zip(self.partitions.all, replies, strict=True)
            for entry_id, f in reply
        ]
        letters.sort(key=lambda pair: _stream_time(pair[0]), reverse=True)
        return [letter for _, letter in letters[:limit]]

    @_translated
    async def dead_letter(self, entry_id: str) -> DeadLetter | None:
        split = self._split_dead_letter_id(entry_id)
        if split is None:
            return None
        keys, stream_id = split
        entries: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
            keys.dead_letter, stream_id, stream_id
        )
        if not entries:
            return None
        fields = entries[0][1]
        return DeadLetter(entry_id, fields.get("task_id", ""), fields)

    def _entry_name(self, keys: Keys, entry_id: str) -> str:
        return f"{keys.index}/{entry_id}" if self._many() else entry_id

    # -- actions

    async def replay(self, entry_ids: Sequence[str]) -> int:
        """Put dead-lettered tasks back on the stream; returns how many were replayed."""
        valid = [e for e in entry_ids if self._split_dead_letter_id(e)]
        return await self.queue.replay_dead_letters(valid) if valid else 0

    @_translated
    async def delete_dead_letters(self, entry_ids: Sequence[str]) -> int:
        """Delete dead letters (their tasks stay, FAILED); returns how many were deleted."""
        per_partition: dict[int, list[str]] = {}
        for entry_id in entry_ids:
            split = self._split_dead_letter_id(entry_id)
            if split:
                per_partition.setdefault(split[0].index, []).append(split[1])
        if not per_partition:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for index, stream_ids in per_partition.items():
                pipe.xdel(self.partitions.all[index].dead_letter, *stream_ids)
            deleted: list[int] = await self.queue._execute(pipe)
        return sum(deleted)

    @_translated
    async def retry(self, task_id: str) -> RetryOutcome:
        """Queue a FAILED or CANCELLED task again (retry.lua)."""
        keys = self.partitions.of_task(task_id)
        if keys is None:
            return RetryOutcome.NOT_FOUND
        reply = await self._retry_script(
            keys=[keys.task(task_id), keys.stream],
            args=[task_id, self.queue.settings.result_expiry],
        )
        return RetryOutcome(reply)

    @_translated
    async def cancel(self, task_id: str) -> CancelOutcome:
        """Cancel any tenant's task, as its own tenant would."""
        record = await self.task(task_id)
        if record is None:
            return CancelOutcome.NOT_FOUND
        return await self.queue.cancel(task_id, record.scope)


def _event(entry_id: str, fields: dict[str, str]) -> TaskEvent:
    """A report as report.lua stored it; read_events.lua reads the same fields."""
    attempt = int(fields.get("attempt") or 1)
    if fields.get("kind") == "progress":
        fraction = float(fields.get("fraction") or 0)
        return TaskEvent(entry_id, "progress", fields.get("message", ""), fraction, attempt)
    return TaskEvent(entry_id, "output", fields.get("chunk", ""), 0.0, attempt)


def _created_at(record: TaskRecord) -> float:
    try:
        return float(record.fields.get("created_at", "0"))
    except ValueError:
        return 0.0


def _stream_time(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _is_stream_id(value: str) -> bool:
    left, dash, right = value.partition("-")
    return bool(dash) and left.isdigit() and right.isdigit() and len(value) <= 41
