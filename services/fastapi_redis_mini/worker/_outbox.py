"""Outcomes waiting to be written, kept per partition, and whether each partition takes them.

Owns Outbox. A partition that refuses outcomes (its master unreachable, its slots down, no
replica to confirm with DURABLE_ACKS=replica) keeps its own waiting and is retried on a backoff
of its own, while the other partitions' outcomes are written as they come: one partition's
trouble holds no flush of another's. Each change of a partition's state is logged once, when it
starts refusing and when it takes outcomes again, and shown as `partition_writable`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from ..core.queue import Finish
from . import metrics

log = logging.getLogger(__name__)

_BACKOFF_BASE = 0.1
_BACKOFF_CAP = 5.0


@dataclass(slots=True)
class _Partition:
    index: int
    waiting: list[Finish] = field(default_factory=list)  # oldest first
    refusing_since: float | None = None  # None while it takes outcomes
    failures: int = 0  # refusals in a row
    retry_at: float = 0.0
    retrying: bool = False  # its retry is on its way


class Outbox:
    """The outcomes a worker has not written yet, per partition."""

    def __init__(
        self,
        partition_count: int,
        partition_of: Callable[[str], int | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._partitions = [_Partition(index) for index in range(partition_count)]
        self._partition_of = partition_of
        self._clock = clock
        for index in range(partition_count):
            metrics.partition_writable.labels(str(index)).set(1)

    def __len__(self) -> int:
        return sum(len(p.waiting) for p in self._partitions)

    def add(self, finish: Finish) -> None:
        self._of(finish).waiting.append(finish)

    def refusing(self) -> frozenset[int]:
        """The partitions that refused their last outcomes: read nothing more from them."""
        return frozenset(p.index for p in self._partitions if p.refusing_since is not None)

    def held_back(self) -> int:
        """Outcomes waiting in partitions that refuse them: they take no slot of the others."""
        return sum(len(p.waiting) for p in self._partitions if p.refusing_since is not None)

    def due(self, limit: int) -> list[Finish]:
        """Up to `limit` outcomes of the partitions that take them, the oldest first."""
        batch: list[Finish] = []
        for partition in self._partitions:
            if partition.refusing_since is None:
                batch += partition.waiting[: limit - len(batch)]
                if len(batch) >= limit:
                    break
        return batch

    def retries_due(self, limit: int) -> list[list[Finish]]:
        """A batch per refusing partition whose backoff is over, to be sent on its own so
        that its wait (a DURABLE_ACK_TIMEOUT, say) holds up no other partition's outcomes.
        Each is marked as on its way until written() or refused() says how it went."""
        now = self._clock()
        batches = []
        for partition in self._partitions:
            if partition.refusing_since is None or partition.retrying:
                continue
            if partition.waiting and partition.retry_at <= now:
                partition.retrying = True
                batches.append(partition.waiting[:limit])
        return batches

    def next_retry_in(self) -> float | None:
        """Seconds until a refusing partition's outcomes are due again; None when none wait."""
        waits = [
            p.retry_at - self._clock()
            for p in self._partitions
            if p.refusing_since is not None and p.waiting and not p.retrying
        ]
        return max(0.0, min(waits)) if waits else None

    def written(self, finishes: Iterable[Finish]) -> None:
        """These were written (or found written): they leave, and their partitions take
        outcomes again."""
        sent: dict[int, set[int]] = {}
        for finish in finishes:
            sent.setdefault(self._of(finish).index, set()).add(id(finish))
        for index, ids in sent.items():
            partition = self._partitions[index]
            partition.waiting = [f for f in partition.waiting if id(f) not in ids]
            if partition.refusing_since is not None:
                log.info(
                    "partition %d takes outcomes again after %.1fs",
                    index, self._clock() - partition.refusing_since,
                    extra={"partition": index},
                )  # fmt: skip
                metrics.partition_writable.labels(str(index)).set(1)
            partition.refusing_since = None
            partition.failures = 0
            partition.retrying = False

    def refused(self, partitions: Collection[int], reason: object) -> None:
        """These partitions refused their outcomes: they wait, and are retried on a backoff."""
        now = self._clock()
        for index in partitions:
            partition = self._partitions[index]
            if partition.refusing_since is None:
                partition.refusing_since = now
                log.warning(
                    "partition %d cannot take outcomes (%s): its %d outcomes wait and are "
                    "retried, the other partitions go on",
                    index, reason, len(partition.waiting),
                    extra={"partition": index},
                )  # fmt: skip
                metrics.partition_writable.labels(str(index)).set(0)
            partition.failures += 1
            partition.retrying = False
            ceiling = min(_BACKOFF_CAP, _BACKOFF_BASE * 2**partition.failures)
            partition.retry_at = now + random.uniform(ceiling / 2, ceiling)

    def partitions_of(self, finishes: Iterable[Finish]) -> set[int]:
        return {self._of(finish).index for finish in finishes}

    def _of(self, finish: Finish) -> _Partition:
        # An id of no partition is sent with partition 0's: the queue answers it as lost.
        index = self._partition_of(finish.job.task_id)
        return self._partitions[index or 0]
