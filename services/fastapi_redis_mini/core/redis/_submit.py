"""The submit side of RedisTaskQueue: a task request becomes a stored, queued task.

Owns SubmitSide, a base of RedisTaskQueue: submit(), which picks the partition a submit goes
to (another one while its own cannot confirm an unkeyed submit: _elsewhere, see
_avoidance.py), and _submit_many, which sends one partition's batch of submits as one
submit.lua call (the submits that meet in one process reach it through a Coalescer). Also
what a submit hands the script (_NewTask), the quota it answers with (_quota) and new_task_id.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from ..batching import Coalescer
from ..models import PRIORITIES, Priority, TaskCreate
from ..queue import QueueUnavailable, SubmitOutcome, SubmitQuota, Submitted
from ..settings import Settings
from ._avoidance import AvoidedPartitions
from ._base import QueueBase, _translated
from ._webhook_messages import completed_url
from .keys import Keys

log = logging.getLogger(__name__)


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


class SubmitSide(QueueBase):
    """RedisTaskQueue's submits (a base class, never made on its own)."""

    # Set by RedisTaskQueue.__init__.
    _submit_script: AsyncScript
    _avoided: AvoidedPartitions
    _submit_coalescers: list[Coalescer[_NewTask, Submitted]]

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
