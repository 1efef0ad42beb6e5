"""Parsing RedisTaskQueue's replies: what a script or a command answers, as the queue's types.

Owns the module-level parsers the queue's parts share: _text (a reply that may come as bytes),
_spread (per-partition replies put back in the order of the items they answer, with the
partitions whose call failed), _partition_stats and _age (stats.lua's object as QueueStats),
and _deliveries (stream entries, from XREADGROUP or XAUTOCLAIM, as Deliveries).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from ..models import PRIORITIES
from ..queue import Delivery, LaneStats, QueueStats, QueueUnavailable
from .keys import Keys

T = TypeVar("T")


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


def _age(entry_id: str, now_ms: int) -> float:
    """Seconds since a stream entry was added (its id starts with that time in ms)."""
    if not entry_id:
        return 0.0
    return max(0, now_ms - int(entry_id.split("-", 1)[0])) / 1000


def _deliveries(entries: Sequence[Any]) -> list[Delivery]:
    # An entry trimmed or deleted after delivery comes back without fields; it has no task.
    return [
        Delivery(entry_id=entry_id, task_id=fields["task_id"])
        for entry_id, fields in entries
        if fields and "task_id" in fields
    ]
