"""What a worker holds about each task it took on, and the decision on how a run ended.

One `InFlight` record per task, from the moment start.lua hands it over until its outcome is
written: a worker never holds two records for one task, so it never starts a task again while
that task's own outcome is still waiting to be written. `decide` is the whole decision on a
run's outcome, a pure function of how the run ended and why it was stopped.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from ..core.handlers import RetryableError
from ..core.queue import Finish, Job, Outcome
from ..core.settings import Settings


class Phase(IntEnum):
    """How far a task got on this worker. An IntEnum: the worker counts records per phase in
    a list indexed by it, which is cheaper per task than hashing an Enum."""

    WAITING = 0  # a suspect: not started, waits until it can run alone
    RUNNING = 1  # its handler runs beside others
    ALONE = 2  # a suspect whose handler runs with nothing beside it
    WRITING = 3  # the handler ended; its outcome waits to be written


class StopReason(StrEnum):
    """Why the worker cancelled a run before its handler returned."""

    CANCELLED = "cancelled"  # a client asked to cancel the task
    LOST = "lost"  # another worker took the entry over: the outcome is theirs
    RELEASED = "released"  # the shutdown grace ran out: the task goes back to the queue
    TIMED_OUT = "timed out"  # it ran for TASK_TIMEOUT: it fails (see RunTimeouts)


@dataclass(slots=True, eq=False)
class InFlight:
    """One task this worker took on: what to run, how far it got, and why it was stopped."""

    job: Job
    phase: Phase
    run: asyncio.Task[None] | None = None
    stop: StopReason | None = None
    deadline: float = math.inf  # on the loop's clock, while its handler call runs


class RunTimeouts:
    """TASK_TIMEOUT for every handler call, through one timer on the loop.

    asyncio.timeout() around each call cost about 5.5 us of a no-op task's 100 or so: a
    context manager and a timer handle per task. TASK_TIMEOUT is the same for every run and
    runs start in order, so the run started first is always the first due: one timer, set for
    the earliest deadline, is enough. When it fires it stops the runs past their deadline
    (StopReason.TIMED_OUT, which the run turns into a TimeoutError) and is set again for the
    earliest deadline left. It looks at the runs only then, about once per TASK_TIMEOUT while
    runs end in time.
    """

    def __init__(self, seconds: float, records: Callable[[], Iterable[InFlight]]) -> None:
        self._seconds = seconds
        self._records = records
        self._timer: asyncio.TimerHandle | None = None

    def started(self, record: InFlight) -> None:
        """The handler call of `record` starts now; call from the loop that runs it."""
        loop = asyncio.get_running_loop()
        record.deadline = loop.time() + self._seconds
        if self._timer is None:
            # A timer set already is due no later: it was set for a run that started earlier.
            self._timer = loop.call_at(record.deadline, self._fire, loop)

    @staticmethod
    def ended(record: InFlight) -> None:
        """The handler call of `record` is over: it can no longer time out."""
        record.deadline = math.inf

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now, earliest = loop.time(), math.inf
        for record in self._records():
            if record.deadline <= now:
                record.deadline = math.inf
                if record.stop is None and record.run is not None and not record.run.done():
                    record.stop = StopReason.TIMED_OUT
                    record.run.cancel()
            elif record.deadline < earliest:
                earliest = record.deadline
        if earliest < math.inf:
            self._timer = loop.call_at(earliest, self._fire, loop)


def decide(
    job: Job,
    ended: BaseException | None,
    result: bytes,
    stop: StopReason | None,
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    jitter: Callable[[], float] = random.random,
) -> Finish | None:
    """The outcome to write for a run, or None when it is not this worker's to write.

    `ended` is what the handler raised (None: it returned `result`, already JSON); a
    CancelledError means the worker stopped it, for the `stop` reason. `jitter` gives a
    number in [0, 1) that spreads the retries of a burst of failures. Both are called only
    when needed, which keeps a DONE outcome, the common one, cheap.
    """
    if stop is StopReason.LOST:
        return None
    if isinstance(ended, asyncio.CancelledError):
        if stop is StopReason.CANCELLED:
            return Finish(job, Outcome.CANCELLED, error="cancelled while running")
        return Finish(job, Outcome.RELEASE, due_at=clock())
    if ended is None:
        return Finish(job, Outcome.DONE, result=result)
    if isinstance(ended, TimeoutError):
        return Finish(job, Outcome.FAILED, error=f"timeout after {settings.task_timeout:g}s")
    description = f"{type(ended).__name__}: {ended}"
    if not isinstance(ended, RetryableError):
        return Finish(job, Outcome.FAILED, error=description)
    if job.attempts > settings.max_retries:
        return Finish(
            job, Outcome.FAILED, error=f"gave up after {job.attempts} attempts: {description}"
        )
    ceiling = min(settings.retry_backoff * 2 ** (job.attempts - 1), settings.retry_backoff_max)
    delay = ceiling / 2 + jitter() * ceiling / 2
    return Finish(job, Outcome.RETRY, error=description, due_at=clock() + delay)
