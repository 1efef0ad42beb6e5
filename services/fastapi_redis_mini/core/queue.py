"""The queue interface (the design's JobQueue) and the records that cross it.

The api and the worker talk to a TaskQueue and never to Redis itself, so a different
broker (Kafka for the stream, say) can stand behind the same interface.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from .models import Task, TaskCreate


class QueueState(StrEnum):
    """Why the broker cannot serve a call right now; the same call may succeed later."""

    UNREACHABLE = "unreachable"  # refused, dropped or timed out: no answer at all
    # States the server reports (its error prefix in brackets), each passing on its own.
    OUT_OF_MEMORY = "out_of_memory"  # [OOM] maxmemory reached under noeviction
    READ_ONLY = "read_only"  # [READONLY] a replica, e.g. right after a failover
    CANNOT_PERSIST = "cannot_persist"  # [MISCONF] the last background save failed
    LOADING = "loading"  # [LOADING] still reading its data set at start
    BUSY = "busy"  # [BUSY] a script or function runs past its time limit
    MASTER_DOWN = "master_down"  # [MASTERDOWN] a replica lost its primary
    TRY_AGAIN = "try_again"  # [TRYAGAIN] a cluster slot is being moved
    CLUSTER_DOWN = "cluster_down"  # [CLUSTERDOWN] the cluster cannot serve
    UNBLOCKED = "unblocked"  # [UNBLOCKED] a blocking read was ended by a role change
    NO_REPLICAS = "no_replicas"  # [NOREPLICAS] too few replicas for min-replicas-to-write


class QueueUnavailable(Exception):  # noqa: N818 - a state, as asyncio.QueueEmpty is
    """The broker cannot serve this call now (`state` says why); retrying later may succeed.

    Every other exception from a queue call is a defect (a bad command, a bad reply) and is
    not retried.
    """

    def __init__(self, state: QueueState, detail: str) -> None:
        super().__init__(f"{state.value}: {detail}")
        self.state = state


class QueueBusy(QueueUnavailable):
    """The broker answered but refuses for now: a transient server state, not a lost link."""


class PartitionsUnavailable(QueueUnavailable):
    """Some partitions could not serve a call that spans several; the others did.

    `failed` names each partition that could not, with why. `partial` is the call's answer,
    item by item as it was asked, with None for every item of a failed partition: those
    items are to be retried, and only those (the others' changes are made).
    """

    def __init__(self, failed: Mapping[int, QueueUnavailable], partial: Sequence[Any]) -> None:
        first = next(iter(failed.values()))
        why: dict[str, list[str]] = {}
        for index, error in sorted(failed.items()):
            why.setdefault(str(error), []).append(str(index))
        detail = "; ".join(f"partition {', '.join(named)}: {error}" for error, named in why.items())
        super().__init__(first.state, detail)
        self.failed = dict(failed)
        self.partial = list(partial)


class SubmitOutcome(StrEnum):
    QUEUED = "queued"
    CACHED = "cached"
    DUPLICATE = "duplicate"
    # Single-flight: an identical request of the same API key is PENDING or RUNNING; its task
    # answers, and nothing is stored.
    COALESCED = "coalesced"
    # Refused, nothing stored: the Idempotency-Key belongs to a task of another request.
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    # Refused, nothing stored: the API key is over its submit rate, or has too many tasks
    # that are not final yet.
    RATE_LIMITED = "rate_limited"
    TOO_MANY_UNFINISHED = "too_many_unfinished"
    TOO_MANY_STORED_BYTES = "too_many_stored_bytes"


@dataclass(frozen=True, slots=True)
class SubmitQuota:
    """Where an API key stands against its submit rate after this submit."""

    limit: int  # submits a key may make at once (SUBMIT_BURST_PER_KEY)
    window_seconds: int  # the time a drained allowance takes to refill
    remaining: int  # whole submits left now
    reset_seconds: int  # until the allowance is full again; refused: until one submit is


@dataclass(frozen=True, slots=True)
class Submitted:
    task_id: str
    outcome: SubmitOutcome
    result: Any | None = None
    quota: SubmitQuota | None = None  # only with a submit rate per key
    # TOO_MANY_STORED_BYTES: seconds until the key's oldest stored tasks stop counting.
    retry_after: int = 0


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # was PENDING, is now CANCELLED and will never run
    REQUESTED = "requested"  # is RUNNING; its worker stops it at the next check
    FINAL = "final"  # already DONE, FAILED or CANCELLED; nothing changed
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry handed to this consumer."""

    entry_id: str
    task_id: str


class StartVerdict(StrEnum):
    RUN = "run"
    SKIP = "skip"  # already final, or gone: acknowledged, nothing to do
    CANCELLED = "cancelled"  # cancelled before it started
    DEAD = "dead"  # reached MAX_DELIVERIES: FAILED and moved to the dead-letter stream
    EXPIRED = "expired"  # not started by its deadline: EXPIRED, never run
    SUSPECT = "suspect"  # in flight when a worker died: left untouched until it can run alone


# The verdicts of a task that start ended rather than started: it is final now.
ENDED_AT_START = (StartVerdict.DEAD, StartVerdict.CANCELLED, StartVerdict.EXPIRED)


@dataclass(slots=True)
class Job:
    """A delivery this worker has been told to run."""

    entry_id: str
    task_id: str
    verdict: StartVerdict
    prompt: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    signature: str = ""
    scope: str = ""
    traceparent: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    attempts: int = 0
    webhook: str = ""
    webhook_events: frozenset[str] = frozenset()


@dataclass(slots=True)
class WebhookMessage:
    """One webhook delivery, kept in the broker until it is delivered or dead-lettered.

    Its id and body are the same on every attempt, whichever sender makes it; `attempt` is
    the attempt being made (counted when the message is claimed) and `last_error` why the
    one before it failed.
    """

    message_id: str
    task_id: str
    url: str
    event: str
    timestamp: float
    data: dict[str, Any]
    scope: str = ""  # the tenant of the task's API key, whose signing key signs it
    attempt: int = 0
    last_error: str = ""
    partition: int = 0  # where the broker keeps it (a cache hit's is the submit's partition)


class WebhookVerdict(StrEnum):
    """How one attempt of a webhook delivery ended, as settle_webhook records it."""

    DELIVERED = "delivered"  # removed, whoever holds it now
    RETRY = "retry"  # due again at `due_at`
    RELEASE = "release"  # its sender stopped: due again now, the attempt not counted
    DEAD = "dead"  # moved to the webhook dead-letter stream


class Outcome(StrEnum):
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    RETRY = "RETRY"  # back to PENDING, due again after a backoff
    RELEASE = "RELEASE"  # back to PENDING at once; used when a worker stops mid-task


@dataclass(frozen=True, slots=True)
class Finish:
    job: Job
    outcome: Outcome
    result: bytes = b""  # the JSON of a DONE task's result
    error: str | None = None
    due_at: float = 0.0
    # A final outcome's `completed` webhook delivery, recorded in the same step as the outcome.
    webhook: WebhookMessage | None = None


class FinishVerdict(StrEnum):
    WRITTEN = "written"
    STALE = "stale"  # the task was already final; only acknowledged
    LOST = "lost"  # another worker owns it now; left alone


@dataclass(frozen=True, slots=True)
class Report:
    """One thing a running handler reported: its progress, or a chunk of partial output."""

    kind: Literal["progress", "output"]
    text: str  # the progress message, or the output chunk
    fraction: float = 0.0  # progress only: from 0 to 1


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """A report as the task's event stream holds it, with the entry id that orders it."""

    entry_id: str
    kind: Literal["progress", "output"]
    text: str
    fraction: float
    attempt: int


@dataclass(frozen=True, slots=True)
class TaskEvents:
    """A task, and the reports after a cursor, read together (see TaskQueue.read_events)."""

    task: Task
    events: list[TaskEvent]


@dataclass(frozen=True, slots=True)
class LaneStats:
    """One priority lane: the tasks waiting in it, and how long the oldest of them has waited."""

    priority: str
    depth: int
    oldest_age: float = 0.0


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Queue depth and ages as the stream and its consumer group report them.

    Ages are seconds on the broker's clock, 0 when nothing is waiting.
    """

    stream: str
    group: str
    stream_length: int
    lag: int
    pending: int
    dead_letter_length: int
    consumers: int = 0
    oldest_undelivered_age: float = 0.0  # the oldest entry the group has not been handed
    oldest_pending_age: float = 0.0  # the oldest entry handed out and not yet acknowledged
    retry_size: int = 0  # tasks waiting out a retry backoff or a delayed start
    webhook_deliveries_pending: int = 0  # not settled yet: due, backing off or being attempted
    webhook_dead_letter_length: int = 0  # deliveries that failed for good
    lanes: tuple[LaneStats, ...] = ()  # with PRIORITY_LANES: each lane, highest first
    partition: int | None = None  # which partition these figures are of, if of one
    # With several partitions: the figures above are their sums (ages and consumers: the
    # largest), and these are each partition's own.
    partitions: tuple[QueueStats, ...] = ()

    @property
    def backlog(self) -> int:
        """Tasks waiting for a worker: the group's lag and every lane's depth."""
        return self.lag + sum(lane.depth for lane in self.lanes)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    task_id: str
    fields: dict[str, str] = field(default_factory=dict)


class TaskQueue(Protocol):
    """Everything the api and the worker need from the broker and the task store."""

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
        """Store a task, or answer from the cache, with the first task of idempotency_key, or
        (single-flight) with the identical request's task in flight.

        `replacing` is the id of the key's first task when the caller found it gone: the key
        then moves to the new task, atomically, unless it already points elsewhere.
        `replacing_in_flight` likewise for the task single-flight named that the caller found
        final. `due_at` (Unix seconds) delays the start; 0 is now.
        """
        ...

    async def get(self, task_id: str, scope: str = "") -> Task | None: ...

    async def wait(self, task_id: str, scope: str, seconds: float) -> Task | None: ...

    async def cancel(self, task_id: str, scope: str = "") -> CancelOutcome: ...

    async def read_events(
        self, task_id: str, scope: str, after: str, count: int
    ) -> TaskEvents | None:
        """The task and at most `count` of its reports after the entry id `after`; None when
        there is no such task. When the task read is final and fewer than `count` reports came
        back, there are no more: reports are refused once a task is final."""
        ...

    def follow(self, task_id: str) -> contextlib.AbstractAsyncContextManager[asyncio.Event]:
        """An event set whenever the task starts, reports or ends (clear it after each read)."""
        ...

    async def stats(self) -> QueueStats: ...

    async def check_writable(self) -> None:
        """Return when the broker accepts writes now; raise QueueUnavailable when not."""
        ...

    async def record_layout(self) -> str | None:
        """Record this process's layout of the queue (partitions, lanes) in the broker, and
        say so when it differs from the one recorded before it: the message to log, else
        None. Every api and worker must use the same keys (QueueUnavailable when the broker
        cannot answer)."""
        ...

    async def writable_partitions(self) -> list[QueueState | None]:
        """Each partition's state now: None when it takes writes, else why it does not."""
        ...

    # -- partitions
    @property
    def partition_count(self) -> int: ...

    def partition_of(self, task_id: str) -> int | None:
        """The partition a task lives in, or None for an id of none."""
        ...

    # -- the worker side
    async def ensure_group(self) -> None: ...

    async def read(
        self, consumer: str, count: int, block_ms: int, *, avoid: Collection[int] = ()
    ) -> list[Delivery]:
        """Up to `count` new deliveries from every partition but those in `avoid`.

        With several partitions, one that cannot be read is left out and the others' entries
        are returned; PartitionsUnavailable is raised only when none could be read.
        """
        ...

    async def claim_idle(
        self, consumer: str, count: int, *, avoid: Collection[int] = ()
    ) -> list[Delivery]: ...

    async def claim_unheard(
        self,
        consumer: str,
        held: Collection[str],
        min_idle: float,
        count: int,
        *,
        avoid: Collection[int] = (),
    ) -> list[Delivery]:
        """`consumer`'s own pending entries, delivered once, idle at least `min_idle` seconds
        and not in `held` (entry ids), claimed again: those a read whose reply was lost
        delivered to it."""
        ...

    # start, finish and keep_alive raise PartitionsUnavailable when only some partitions
    # failed: its `partial` holds the answers of the others.
    async def start(
        self, consumer: str, deliveries: Sequence[Delivery], *, alone: bool = False
    ) -> list[Job]: ...

    @property
    def takes(self) -> bool:
        """Whether take() can be used: it reads and starts in one call."""
        ...

    async def take(self, consumer: str, count: int) -> list[Job]:
        """Up to `count` new entries read and their tasks started, as read() and start() do,
        in one call that never blocks: [] when there is nothing new."""
        ...

    async def finish(self, consumer: str, finishes: Sequence[Finish]) -> list[FinishVerdict]: ...

    async def keep_alive(self, consumer: str, jobs: Sequence[Job]) -> list[str]: ...

    async def report(self, consumer: str, task_id: str, reports: Sequence[Report]) -> bool:
        """Store a running task's reports; False when the run is no longer this consumer's."""
        ...

    async def enqueue_webhooks(self, messages: Sequence[WebhookMessage]) -> None:
        """Record webhook deliveries, due now, for any worker to send."""
        ...

    async def claim_webhooks(self, count: int, lease: float) -> list[WebhookMessage]:
        """Up to `count` due deliveries, each taken for one attempt: due again after `lease`
        seconds unless settled before, so a sender that dies leaves them to the others."""
        ...

    async def settle_webhook(
        self, message: WebhookMessage, verdict: WebhookVerdict, *, due_at: float = 0.0
    ) -> bool:
        """Record how an attempt ended; False when another sender took the message since (a
        lease that ran out) or it was settled already, and nothing changed."""
        ...

    async def webhook_dead_letters(self, count: int) -> list[DeadLetter]:
        """The newest webhook deliveries that failed for good, at most `count` per partition."""
        ...

    async def promote_due_retries(self, limit: int) -> int: ...

    async def trim(self) -> int: ...

    async def leave(self, consumer: str) -> None: ...

    # -- operators
    async def dead_letters(self, count: int) -> list[DeadLetter]: ...

    async def replay_dead_letters(self, entry_ids: Sequence[str]) -> int: ...
