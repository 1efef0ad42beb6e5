"""The worker: reads the task stream in batches and runs up to MAX_CONCURRENCY tasks at once.

Delivery is at-least-once. An entry is acknowledged only in the same atomic step that writes
its task's outcome; entries of a worker that dies are reclaimed by the others once they have
been idle for CLAIM_IDLE, and a live worker keeps its own entries fresh so nobody steals them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import orjson
from opentelemetry import propagate, trace

from ..core.handlers import RetryableError, TaskHandler
from ..core.queue import (
    Delivery,
    Finish,
    FinishVerdict,
    Job,
    Outcome,
    QueueUnavailable,
    StartVerdict,
    TaskQueue,
)
from ..core.settings import Settings
from ..core.telemetry.metrics import redis_errors
from . import metrics

log = logging.getLogger(__name__)

_FINISH_BATCH = 500
_RETRY_PROMOTE_INTERVAL = 0.5
_TRIM_INTERVAL = 10.0


def consumer_name() -> str:
    """Unique per process, and readable in XINFO CONSUMERS: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """Consumes the task stream until stop() is called, then drains within SHUTDOWN_GRACE."""

    def __init__(
        self,
        queue: TaskQueue,
        handler: TaskHandler,
        settings: Settings,
        *,
        consumer: str | None = None,
        tracing: bool = False,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.settings = settings
        self.consumer = consumer or consumer_name()
        self.tracing = tracing
        self.last_progress = time.monotonic()
        self._jobs: dict[str, Job] = {}  # entry id -> job, from start until its outcome is written
        self._runs: dict[str, asyncio.Task[None]] = {}  # entry id -> the handler's task
        self._finished: list[Finish] = []
        # Suspects: delivered to us, not started, waiting to run alone (see start.lua).
        self._suspects: dict[str, Job] = {}
        self._alone: str | None = None  # the entry of the suspect running alone, if any
        self._cancel_requested: set[str] = set()
        self._lost: set[str] = set()
        self._releasing = False
        self._stopping = asyncio.Event()
        self._closed = asyncio.Event()  # set once draining is over: the helper loops end
        self._slot_free = asyncio.Event()
        self._flush_needed = asyncio.Event()
        self._tracer = trace.get_tracer(__name__)

    def stop(self) -> None:
        """Stop reading; run() returns once in-flight tasks are finished or released."""
        if not self._stopping.is_set():
            log.info("stopping: finishing %d in-flight tasks", len(self._runs))
            self._stopping.set()

    @property
    def in_flight(self) -> int:
        """Tasks whose handler is running."""
        return len(self._runs)

    def _free_slots(self) -> int:
        if self._suspects or self._alone in self._runs:
            return 0  # nothing new runs beside a suspect, nor while suspects wait
        # A slot frees when its handler returns, so the next batch is read while the previous
        # outcomes are being written. Unwritten outcomes are capped too, so a slow Redis
        # cannot let them pile up.
        running = self.settings.max_concurrency - len(self._runs)
        unwritten = 2 * self.settings.max_concurrency - len(self._jobs)
        return min(running, unwritten)

    async def run(self) -> None:
        metrics.worker_concurrency_limit.set(self.settings.max_concurrency)
        if not await self._ensure_group():
            return
        log.info(
            "consuming as %s (max_concurrency=%d, claim_idle=%gs)",
            self.consumer, self.settings.max_concurrency, self.settings.claim_idle,
        )  # fmt: skip
        helpers = [
            asyncio.create_task(self._flush_loop(), name="flush"),
            asyncio.create_task(self._keep_alive_loop(), name="keep-alive"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
        ]
        try:
            await self._consume_loop()
            await self._drain()
        finally:
            # The loops end on their own once closed is set. Cancelling is only the fallback:
            # a cancel that lands inside a Redis command can be swallowed by the client, so
            # nothing here waits on a cancelled task without a limit.
            self._closed.set()
            _, unfinished = await asyncio.wait(helpers, timeout=1)
            for helper in unfinished:
                helper.cancel()
            if unfinished:
                await asyncio.wait(unfinished, timeout=1)
        # Every step of stopping is bounded, so a worker stops within SHUTDOWN_GRACE plus a
        # few seconds even while Redis is unreachable; what it could not write stays pending
        # and is reclaimed.
        await _within(1.0, self.queue.leave(self.consumer))
        log.info("stopped")

    async def _ensure_group(self) -> bool:
        backoff = _Backoff()
        while not self._stopping.is_set():
            self.last_progress = time.monotonic()  # waiting for Redis is not a stall
            try:
                await self.queue.ensure_group()
                return True
            except QueueUnavailable as error:
                redis_errors.labels("ensure_group").inc()
                log.warning("redis unavailable at start (%s); retrying", error)
                await _sleep_or_stop(backoff.next(), self._stopping)
        return False

    # -- reading and starting

    async def _consume_loop(self) -> None:
        backoff = _Backoff()
        while not self._stopping.is_set():
            self.last_progress = time.monotonic()
            if self._suspects and not self._runs:
                try:
                    await self._run_suspect_alone()
                except QueueUnavailable as error:
                    redis_errors.labels("start").inc()
                    log.warning("redis unavailable while starting (%s); retrying", error)
                    await _sleep_or_stop(backoff.next(), self._stopping)
                continue
            free = self._free_slots()
            if free <= 0:
                self._slot_free.clear()
                await _first(self._slot_free.wait(), self._stopping.wait())
                continue
            try:
                count = min(free, self.settings.read_batch)
                deliveries = await self.queue.read(self.consumer, count, block_ms=1000)
                await self._begin(deliveries)
                backoff.reset()
            except QueueUnavailable as error:
                redis_errors.labels("read").inc()
                log.warning("redis unavailable while reading (%s); retrying", error)
                await _sleep_or_stop(backoff.next(), self._stopping)

    async def _begin(self, deliveries: Sequence[Delivery]) -> int:
        """Start what was delivered; returns how many deliveries this worker took on."""
        if not deliveries:
            return 0
        taken = 0
        for job in await self.queue.start(self.consumer, deliveries):
            taken += self._take(job)
        metrics.tasks_in_flight.set(len(self._runs))
        return taken

    def _take(self, job: Job) -> bool:
        """Act on what start decided for one delivery; False when it is left to others."""
        if job.verdict is StartVerdict.RUN:
            self._jobs[job.entry_id] = job
            self._runs[job.entry_id] = asyncio.create_task(self._execute(job))
        elif job.verdict is StartVerdict.SUSPECT:
            if self._suspects:
                # One suspect at a time per worker: the others are not kept alive here, so
                # they go idle again and the next worker to claim takes them. Recovery from a
                # crash is shared instead of queued behind one worker.
                return False
            self._suspects[job.entry_id] = job
            log.info(
                "task was in flight when a worker died: it will run alone",
                extra={"task_id": job.task_id},
            )
        elif job.verdict is StartVerdict.DEAD:
            metrics.tasks_dead_lettered.inc()
            metrics.tasks_finished.labels("FAILED").inc()
            log.warning("task dead-lettered", extra={"task_id": job.task_id})
        elif job.verdict is StartVerdict.CANCELLED:
            metrics.tasks_finished.labels("CANCELLED").inc()
        return True

    async def _run_suspect_alone(self) -> None:
        entry_id, suspect = next(iter(self._suspects.items()))
        delivery = Delivery(entry_id=entry_id, task_id=suspect.task_id)
        [job] = await self.queue.start(self.consumer, [delivery], alone=True)
        del self._suspects[entry_id]
        self._take(job)
        metrics.tasks_in_flight.set(len(self._runs))
        if job.verdict is StartVerdict.RUN:
            self._alone = entry_id

    # -- running one task

    async def _execute(self, job: Job) -> None:
        metrics.task_queue_wait.observe(max(0.0, job.started_at - job.created_at))
        finish: Finish | None
        try:
            with self._span(job):
                finish = await self._run_handler(job)
        finally:
            self._runs.pop(job.entry_id, None)
            self._slot_free.set()
        if finish is None:  # another worker took the entry over; its outcome is theirs
            self._forget(job.entry_id)
            return
        self._finished.append(finish)
        self._flush_needed.set()

    async def _run_handler(self, job: Job) -> Finish | None:
        timeout = self.settings.task_timeout
        try:
            async with asyncio.timeout(timeout):
                result = await self.handler(job.prompt, job.params)
            return Finish(job, Outcome.DONE, result=orjson.dumps(result))
        except TimeoutError:
            return Finish(job, Outcome.FAILED, error=f"timeout after {timeout:g}s")
        except RetryableError as error:
            return self._retry_or_fail(job, error)
        except asyncio.CancelledError:
            if job.entry_id in self._lost:
                return None
            if job.entry_id in self._cancel_requested:
                return Finish(job, Outcome.CANCELLED, error="cancelled while running")
            if self._releasing:
                return Finish(job, Outcome.RELEASE, due_at=time.time())
            raise
        except Exception as error:
            log.warning("task failed: %s", type(error).__name__, extra={"task_id": job.task_id})
            return Finish(job, Outcome.FAILED, error=f"{type(error).__name__}: {error}")

    def _retry_or_fail(self, job: Job, error: RetryableError) -> Finish:
        description = f"{type(error).__name__}: {error}"
        if job.attempts > self.settings.max_retries:
            return Finish(
                job, Outcome.FAILED, error=f"gave up after {job.attempts} attempts: {description}"
            )
        ceiling = min(
            self.settings.retry_backoff * 2 ** (job.attempts - 1), self.settings.retry_backoff_max
        )
        delay = random.uniform(ceiling / 2, ceiling)  # jitter spreads out a burst of retries
        return Finish(job, Outcome.RETRY, error=description, due_at=time.time() + delay)

    def _span(self, job: Job) -> contextlib.AbstractContextManager[Any]:
        if not self.tracing:
            return contextlib.nullcontext()
        parent = propagate.extract({"traceparent": job.traceparent} if job.traceparent else {})
        return self._tracer.start_as_current_span(
            "task.run",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={"task.id": job.task_id, "task.attempt": job.attempts},
        )

    # -- writing outcomes

    async def _flush_loop(self) -> None:
        backoff = _Backoff()
        while True:
            await _first(self._flush_needed.wait(), self._closed.wait())
            if self._closed.is_set():
                return
            self._flush_needed.clear()
            while self._finished:
                batch = self._finished[:_FINISH_BATCH]
                try:
                    verdicts = await self.queue.finish(self.consumer, batch)
                except QueueUnavailable as error:
                    # The outcomes stay buffered and their entries unacknowledged: nothing is
                    # lost, and a worker that dies meanwhile leaves them to be reclaimed.
                    redis_errors.labels("finish").inc()
                    log.warning("redis unavailable while finishing (%s); retrying", error)
                    await _sleep_or_stop(backoff.next(), self._closed)
                    if self._closed.is_set():
                        return
                    continue
                backoff.reset()
                del self._finished[: len(batch)]
                self._record(batch, verdicts)

    def _record(self, batch: Sequence[Finish], verdicts: Sequence[FinishVerdict]) -> None:
        now = time.time()
        metrics.tasks_in_flight.set(len(self._runs))
        for finish, verdict in zip(batch, verdicts, strict=True):
            job = finish.job
            self._forget(job.entry_id)
            if verdict is not FinishVerdict.WRITTEN:
                continue
            if finish.outcome is Outcome.RETRY:
                metrics.tasks_retried.inc()
            elif finish.outcome is not Outcome.RELEASE:
                metrics.tasks_finished.labels(finish.outcome.value).inc()
                metrics.task_run.observe(max(0.0, now - job.started_at))
                metrics.task_end_to_end.observe(max(0.0, now - job.created_at))

    def _forget(self, entry_id: str) -> None:
        self._jobs.pop(entry_id, None)
        self._cancel_requested.discard(entry_id)
        self._lost.discard(entry_id)
        self._slot_free.set()

    # -- keeping entries, reclaiming others', housekeeping

    async def _keep_alive_loop(self) -> None:
        interval = min(self.settings.claim_idle / 3, 10.0)
        while not self._closed.is_set():
            await _sleep_or_stop(interval, self._closed)
            # Entries whose outcome is not written yet, and suspects waiting to run alone, are
            # kept alive too: they are still ours.
            running = [*self._jobs.values(), *self._suspects.values()]
            try:
                for start in range(0, len(running), _FINISH_BATCH):
                    chunk = running[start : start + _FINISH_BATCH]
                    replies = await self.queue.keep_alive(self.consumer, chunk)
                    for job, reply in zip(chunk, replies, strict=True):
                        self._on_keep_alive(job, reply)
            except QueueUnavailable:
                redis_errors.labels("keep_alive").inc()

    def _on_keep_alive(self, job: Job, reply: str) -> None:
        if reply == "lost":
            self._suspects.pop(job.entry_id, None)  # another worker runs it now
        run = self._runs.get(job.entry_id)
        if reply == "ok" or run is None:  # no run to stop: not started, or outcome on its way
            return
        if reply == "cancel":
            self._cancel_requested.add(job.entry_id)
            log.info("cancelling at the client's request", extra={"task_id": job.task_id})
        else:
            self._lost.add(job.entry_id)
            log.warning("entry taken over by another worker", extra={"task_id": job.task_id})
        run.cancel()

    async def _maintenance_loop(self) -> None:
        claim_every = max(self.settings.claim_idle / 2, 0.5)
        next_claim = time.monotonic() + claim_every
        next_trim = time.monotonic() + _TRIM_INTERVAL
        while not self._stopping.is_set():
            await _sleep_or_stop(_RETRY_PROMOTE_INTERVAL, self._stopping)
            now = time.monotonic()
            try:
                await self.queue.promote_due_retries(limit=1000)
                free = self._free_slots()
                if now >= next_claim and free > 0 and not self._stopping.is_set():
                    next_claim = now + claim_every
                    claimed = await self.queue.claim_idle(self.consumer, free)
                    # Entries of our own that went idle (keep-alive could not reach Redis during
                    # an outage) are still running here: claiming them only resets their idle
                    # time, and they must not be started a second time.
                    reclaimed = [
                        d for d in claimed if d.entry_id not in self._jobs | self._suspects
                    ]
                    taken = await self._begin(reclaimed)
                    if taken:
                        metrics.tasks_reclaimed.inc(taken)
                        log.info("reclaimed %d idle entries", taken)
                if now >= next_trim:
                    next_trim = now + _TRIM_INTERVAL
                    await self.queue.trim()
            except QueueUnavailable:
                redis_errors.labels("maintenance").inc()

    # -- stopping

    async def _drain(self) -> None:
        grace = self.settings.shutdown_grace
        deadline = time.monotonic() + grace
        if self._runs:
            await asyncio.wait(list(self._runs.values()), timeout=grace)
        if self._runs:
            # Past the grace: hand the rest back to the queue at once instead of leaving them
            # for CLAIM_IDLE, and never write a half-finished result.
            log.warning("grace of %gs over: releasing %d tasks", grace, len(self._runs))
            self._releasing = True
            for run in list(self._runs.values()):
                run.cancel()
            await asyncio.wait(list(self._runs.values()), timeout=1)
        flush_until = max(deadline, time.monotonic()) + 2.0
        while self._jobs and time.monotonic() < flush_until:
            self._flush_needed.set()
            await asyncio.sleep(0.05)
        if self._jobs:
            log.warning("%d outcomes unwritten; their tasks will be reclaimed", len(self._jobs))


class _Backoff:
    """Capped exponential backoff with jitter, for reconnecting to Redis."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        self.attempt += 1
        return random.uniform(0, min(self.cap, self.base * 2**self.attempt))

    def reset(self) -> None:
        self.attempt = 0


async def _first(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


async def _within(seconds: float, call: Awaitable[Any]) -> None:
    """Run a best-effort call for at most `seconds`, whatever it raises or swallows."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait([task], timeout=seconds)
    if not done:
        task.cancel()
    elif not task.cancelled() and task.exception() is not None:
        log.debug("best-effort call failed: %s", task.exception())


async def _sleep_or_stop(seconds: float, stopping: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
