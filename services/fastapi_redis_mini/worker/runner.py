"""The worker: reads the task stream in batches and runs up to MAX_CONCURRENCY tasks at once.

On a single server with one partition, while there is work, each batch is read and started in
one script call (queue.take), half of MAX_CONCURRENCY at a time: the next batch is being
started in Redis while the last one runs, instead of the worker and Redis taking turns.

Delivery is at-least-once. An entry is acknowledged only in the same atomic step that writes
its task's outcome; entries of a worker that dies are reclaimed by the others once they have
been idle for CLAIM_IDLE, and a live worker keeps its own entries fresh so nobody steals them.
Run with a Sidecar, as `python -m fastapi_redis_mini.worker` does, the keep-alive and a watchdog
of the loop run on a thread of their own, so a handler that blocks the loop cannot make another
worker take its task over (see _sidecar.py and _handler.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Collection, Coroutine, Sequence
from typing import Any

import orjson
from opentelemetry import trace

from ..core.handlers import AnyTaskHandler, RetryableError
from ..core.queue import (
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
    TaskQueue,
)
from ..core.settings import Settings
from ..core.telemetry.metrics import observe_each, redis_errors
from ..core.webhooks import WebhookEvent
from . import _telemetry, metrics
from ._handler import HandlerRunner
from ._outbox import Outbox
from ._report import NO_REPORTS as _NO_REPORTS
from ._report import TaskReports
from ._sidecar import Sidecar
from ._webhooks import WebhookSender
from .inflight import InFlight, Phase, RunTimeouts, StopReason, decide

log = logging.getLogger(__name__)

_FINISH_BATCH = 500
_RETRY_PROMOTE_INTERVAL = 0.5
_TRIM_INTERVAL = 10.0
# How often, after a read that failed, the worker asks Redis for entries that read may have
# delivered to it unheard (see _take_back_unheard).
_UNHEARD_CHECK_INTERVAL = 0.5
_RUN_PHASES = (Phase.RUNNING, Phase.ALONE)
_FINAL = (Outcome.DONE, Outcome.FAILED, Outcome.CANCELLED)
# How long a run's last reports may take to be sent before its outcome is written anyway.
_REPORTS_GRACE = 2.0
_CLOSE_TIMEOUT = 5.0  # for the handler's close(), within the pod's termination grace


class WorkerFailed(Exception):  # noqa: N818 - named for what happened, as it is logged
    """A loop of the worker ended unexpectedly: the process must exit and be restarted."""


def consumer_name() -> str:
    """Unique per process, and readable in XINFO CONSUMERS: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """Consumes the task stream until stop() is called, then drains within SHUTDOWN_GRACE.

    If one of its loops ends unexpectedly, the worker logs why, fails /healthz, stops as it
    would on SIGTERM and then run() raises WorkerFailed: a live worker with a dead loop
    would hold its entries and do nothing with them.
    """

    def __init__(
        self,
        queue: TaskQueue,
        handler: AnyTaskHandler,
        settings: Settings,
        *,
        consumer: str | None = None,
        tracing: bool = False,
        sidecar: Sidecar | None = None,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.runner = HandlerRunner(handler, settings)
        self.webhooks = WebhookSender(settings, queue)
        self._reports_lock = threading.Lock()  # shared by the runs' TaskReports
        self._call = self.runner.call
        self.sidecar = sidecar
        self.loading = True  # until the handler's load() has returned
        self.loop_beat = time.monotonic()  # the loop's last sign of life, for the watchdog
        self._closed_flag = threading.Event()  # _closed, for loops on the sidecar's thread
        self.settings = settings
        self.consumer = consumer or consumer_name()
        self.tracing = tracing
        self.last_progress = time.monotonic()
        self.failure: str | None = None  # why the worker is going down, once it is
        self._tasks: dict[str, InFlight] = {}  # task id -> what this worker holds of it
        self._timeouts = RunTimeouts(settings.task_timeout, self._tasks.values)
        # A take's tasks at most: half the slots, so one batch is started in Redis while the
        # other runs, but a batched handler's whole batch, or tasks already waiting together
        # could reach the model in two calls where one would do.
        self._take_at_most = max(1, (settings.max_concurrency + 1) // 2, self.runner.batch_size)
        self._phases = [0] * len(Phase)  # how many records are in each phase
        # Outcomes waiting to be written, per partition (see _outbox.py).
        self._outbox = Outbox(queue.partition_count, queue.partition_of)
        # Tasks whose outcome was sent in a call that then failed: the script may have run
        # (a durable wait that timed out, a reply lost on the way back). If the retry finds
        # such a task final, that is this worker's own write, and it is counted as written.
        self._unsure: set[str] = set()
        # A read, take or start that failed may have run in Redis all the same (a reply lost
        # to a timeout): its entries are then pending for this worker, which never heard of
        # them. Until this time, they are looked for and claimed back once idle longer than
        # any call of this worker lasts (a try and its retry), instead of after CLAIM_IDLE.
        self._unheard_until = 0.0
        self._unheard_check_at = 0.0
        self._unheard_idle = 2 * settings.redis_socket_timeout + 1.0
        self._stopping = asyncio.Event()
        self._closed = asyncio.Event()  # set once draining is over: the helper loops end
        self._slot_free = asyncio.Event()
        self._flush_needed = asyncio.Event()
        self._tracer = trace.get_tracer(__name__)

    def stop(self) -> None:
        """Stop reading; run() returns once in-flight tasks are finished or released."""
        if not self._stopping.is_set():
            log.info("stopping: finishing %d in-flight tasks", self.in_flight)
            self._stopping.set()

    def fail(self, reason: str, error: BaseException | None = None) -> None:
        """Something the worker cannot do without has ended: stop, and make run() raise."""
        if self.failure is None:
            self.failure = reason
            log.error("%s; the worker stops and exits", reason, exc_info=error)
        self.stop()

    @property
    def in_flight(self) -> int:
        """Tasks whose handler is running."""
        return self._phases[Phase.RUNNING] + self._phases[Phase.ALONE]

    def refusing_partitions(self) -> frozenset[int]:
        """The partitions that refuse this worker's outcomes now (see _outbox.py)."""
        return self._outbox.refusing()

    def _hold(self, record: InFlight) -> None:
        self._tasks[record.job.task_id] = record
        self._phases[record.phase] += 1

    def _move(self, record: InFlight, phase: Phase) -> None:
        self._phases[record.phase] -= 1
        self._phases[phase] += 1
        record.phase = phase

    def _let_go(self, record: InFlight) -> None:
        task_id = record.job.task_id
        if self._tasks.get(task_id) is record:
            del self._tasks[task_id]
            self._phases[record.phase] -= 1
        self._slot_free.set()

    def _free_slots(self) -> int:
        if self._phases[Phase.WAITING] or self._phases[Phase.ALONE]:
            return 0  # nothing new runs beside a suspect, nor while suspects wait
        # A slot frees when its handler returns, so the next batch is read while the previous
        # outcomes are being written. Unwritten outcomes are capped too, so a Redis that
        # refuses writes cannot let them pile up. Those of a partition that refuses them are
        # not counted: nothing more is read from it (see _consume_loop), so they cannot grow,
        # and the other partitions' work goes on beside them.
        running = self.settings.max_concurrency - self.in_flight
        unwritten = 2 * self.settings.max_concurrency - len(self._tasks) + self._outbox.held_back()
        return min(running, unwritten)

    async def run(self) -> None:
        metrics.worker_concurrency_limit.set(self.settings.max_concurrency)
        helpers = [self._loop(self._beat_loop(), "heartbeat", self._closed)]
        if self.sidecar is not None:
            helpers.append(
                self._loop(self.sidecar.run(self._watch_loop()), "watchdog", self._closed)
            )
        try:
            if await self._load() and await self._ensure_group():
                log.info(
                    "consuming as %s (max_concurrency=%d, claim_idle=%gs, handler %s, %s)",
                    self.consumer, self.settings.max_concurrency, self.settings.claim_idle,
                    self.runner.name, "async" if self.runner.is_async else
                    f"{self.settings.handler_thread_count} x {self.settings.handler_pool}",
                )  # fmt: skip
                consume = self._loop(self._consume_loop(), "consume", self._stopping)
                if self.sidecar is None:
                    keep_alive = self._loop(
                        self._keep_alive_loop(self.queue, None), "keep-alive", self._closed
                    )
                else:
                    body = self._keep_alive_loop(self.sidecar.queue, asyncio.get_running_loop())
                    keep_alive = self._loop(self.sidecar.run(body), "keep-alive", self._closed)
                helpers += [
                    self._loop(self._flush_loop(), "flush", self._closed),
                    self._loop(self.webhooks.run(self._closed), "webhooks", self._closed),
                    keep_alive,
                    self._loop(self._maintenance_loop(), "maintenance", self._stopping),
                ]
                await asyncio.wait([consume])
                await self._drain()
        finally:
            # The loops end on their own once closed is set. Cancelling is only the fallback:
            # a cancel that lands inside a Redis command can be swallowed by the client, so
            # nothing here waits on a cancelled task without a limit.
            self._closed.set()
            self._closed_flag.set()
            _, unfinished = await asyncio.wait(helpers, timeout=1)
            for helper in unfinished:
                helper.cancel()
            if unfinished:
                await asyncio.wait(unfinished, timeout=1)
            self._timeouts.close()
            await self.runner.close(_CLOSE_TIMEOUT)
            await self.webhooks.close(_CLOSE_TIMEOUT)
        # Every step of stopping is bounded, so a worker stops within SHUTDOWN_GRACE plus a
        # few seconds even while Redis is unreachable; what it could not write stays pending
        # and is reclaimed.
        await _within(1.0, self.queue.leave(self.consumer))
        log.info("stopped")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise WorkerFailed(self.failure)

    def _loop(
        self,
        body: Coroutine[Any, Any, None] | asyncio.Future[None],
        name: str,
        ends_with: asyncio.Event,
    ) -> asyncio.Future[None]:
        """Start one of the worker's loops, watched: it may end only once `ends_with` is set.

        `body` is a coroutine to run on this loop, or the future of one the sidecar runs.
        """

        def ended(task: asyncio.Future[None]) -> None:
            if task.cancelled():
                if not self._closed.is_set():
                    self.fail(f"the {name} loop was cancelled")
                return
            error = task.exception()
            if error is not None:
                self.fail(f"the {name} loop ended with {type(error).__name__}: {error}", error)
            elif not ends_with.is_set():
                self.fail(f"the {name} loop ended unexpectedly")

        task = body if isinstance(body, asyncio.Future) else asyncio.create_task(body, name=name)
        task.add_done_callback(ended)
        return task

    async def _load(self) -> bool:
        """Run the handler's load() before anything is read; False if it failed or we stop."""
        loading = asyncio.ensure_future(self.runner.load())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done():
            loading.cancel()  # a load() in a thread runs on; the process is going down
            return False
        error = loading.exception()
        if error is not None:
            self.fail(f"handler {self.runner.name}: load() failed with {type(error).__name__}: "
                      f"{error}", error)  # fmt: skip
            return False
        self.loading = False
        return True

    async def _ensure_group(self) -> bool:
        backoff = _Backoff()
        while not self._stopping.is_set():
            self.last_progress = time.monotonic()  # waiting for Redis is not a stall
            try:
                warning = await self.queue.record_layout()
                if warning is not None:
                    log.error("%s", warning)
                await self.queue.ensure_group()
                return True
            except QueueUnavailable as error:
                redis_errors.labels("ensure_group").inc()
                log.warning("redis cannot create the group (%s); retrying", error)
                await _sleep_or_stop(backoff.next(), self._stopping)
        return False

    # -- reading and starting

    async def _consume_loop(self) -> None:
        backoff = _Backoff()
        while not self._stopping.is_set():
            self.last_progress = time.monotonic()
            if self._phases[Phase.WAITING] and not self.in_flight:
                try:
                    await self._run_suspect_alone()
                    backoff.reset()
                except QueueUnavailable as error:
                    redis_errors.labels("start").inc()
                    log.warning("redis cannot start a task (%s); retrying", error)
                    await _sleep_or_stop(backoff.next(), self._stopping)
                continue
            free = self._free_slots()
            if free <= 0:
                # Bounded, so that a worker whose outcomes Redis refuses for long still shows
                # progress: it is waiting for Redis, not stalled.
                self._slot_free.clear()
                await _first(self._slot_free.wait(), self._stopping.wait(), at_most=1.0)
                continue
            count = min(free, self.settings.read_batch)
            refusing = self._outbox.refusing()
            try:
                if (
                    self._unheard_until
                    and time.monotonic() >= self._unheard_check_at
                    and await self._take_back_unheard(count, refusing)
                ):
                    backoff.reset()
                    continue
                if self.queue.takes and not refusing:
                    # Read and start in one call, which never blocks: while there is work, the
                    # next batch is started in Redis while this one runs. Nothing new: the
                    # blocking read below waits for it.
                    jobs = await self.queue.take(self.consumer, min(count, self._take_at_most))
                    if jobs:
                        backoff.reset()
                        self._took(jobs)
                        continue
                deliveries = await self.queue.read(
                    self.consumer, count, block_ms=1000, avoid=refusing
                )
                backoff.reset()
            except QueueUnavailable as error:
                redis_errors.labels("read").inc()
                log.warning("redis cannot be read (%s); retrying", error)
                self._may_have_lost_deliveries()
                await _sleep_or_stop(backoff.next(), self._stopping)
                continue
            await self._begin(deliveries)

    def _may_have_lost_deliveries(self) -> None:
        """A call that delivers entries failed: look for them (see _take_back_unheard) for
        CLAIM_IDLE from now, after which the idle claim finds them anyway."""
        if self._unheard_idle < self.settings.claim_idle:
            self._unheard_until = time.monotonic() + self.settings.claim_idle

    async def _take_back_unheard(self, count: int, refusing: Collection[int]) -> int:
        """Claim back and start the entries that reads which failed may have delivered to
        this worker; returns how many it took on. Called from the consume loop only, so no
        read of this worker is on its way meanwhile."""
        now = time.monotonic()
        if now >= self._unheard_until:
            self._unheard_until = 0.0
            return 0
        self._unheard_check_at = now + _UNHEARD_CHECK_INTERVAL
        held = {record.job.entry_id for record in self._tasks.values()}
        unheard = await self.queue.claim_unheard(
            self.consumer, held, self._unheard_idle, count, avoid=refusing
        )
        # Delivered once, to this worker (whose name no earlier process had), and never held
        # by it: no handler has run them, so none is a suspect (see claim_unheard).
        taken = await self._begin(unheard, never_ran=True)
        if taken:
            metrics.tasks_reclaimed.inc(taken)
            log.info("claimed back %d entries delivered by a read whose reply was lost", taken)
        return taken

    async def _begin(self, deliveries: Sequence[Delivery], *, never_ran: bool = False) -> int:
        """Start what was delivered; returns how many deliveries this worker took on.

        A delivery of a task this worker already holds is left alone: its entry goes idle and
        is reclaimed once this worker has written the task's outcome, and then only
        acknowledged. Deliveries that Redis refuses to start are tried again (they are
        already ours) for up to CLAIM_IDLE/2: past that, another worker may have reclaimed and
        started them, so they are left pending for whoever claims them next.

        `never_ran`: no handler has run these tasks, though a start may have counted them (a
        take whose reply was lost), so none is held back as a suspect to run alone.
        """
        fresh = [d for d in deliveries if d.task_id not in self._tasks]
        if not fresh:
            return 0
        give_up_at = time.monotonic() + self.settings.claim_idle / 2
        backoff = _Backoff()
        while True:
            try:
                # Started "alone" as far as start.lua is concerned: it then runs a task that
                # was counted as started before instead of holding it back as a suspect.
                jobs = await self.queue.start(self.consumer, fresh, alone=never_ran)
                break
            except QueueUnavailable as error:
                redis_errors.labels("start").inc()
                self._may_have_lost_deliveries()
                partial = error.partial if isinstance(error, PartitionsUnavailable) else []
                jobs = [job for job in partial if job is not None]
                if jobs:
                    # The other partitions' tasks started: they run now. Those of the
                    # partitions that failed are not retried here, where they would hold up
                    # the healthy partitions' work: they stay pending, reclaimed once idle.
                    log.warning("redis cannot start some tasks (%s); left to be reclaimed", error)
                    break
                if self._stopping.is_set() or time.monotonic() >= give_up_at:
                    log.warning("redis cannot start tasks (%s); left to be reclaimed", error)
                    return 0
                log.warning("redis cannot start tasks (%s); retrying", error)
                self.last_progress = time.monotonic()
                pause = min(backoff.next(), give_up_at - time.monotonic())
                await _sleep_or_stop(max(pause, 0.0), self._stopping)
        return self._took(jobs)

    def _took(self, jobs: Sequence[Job], *, alone: bool = False) -> int:
        """Act on what start decided for each of `jobs`; returns how many were taken on."""
        taken = 0
        for job in jobs:
            taken += self._take(job, alone=alone)
        observe_each(
            metrics.task_queue_wait,
            [max(0.0, j.started_at - j.created_at) for j in jobs if j.verdict is StartVerdict.RUN],
        )
        metrics.tasks_in_flight.set(self.in_flight)
        return taken

    def _take(self, job: Job, *, alone: bool = False) -> bool:
        """Act on what start decided for one delivery; False when it is left to others."""
        if job.verdict in ENDED_AT_START:
            # start.lua recorded the completed delivery of any with a webhook: send it now
            # rather than at the next poll.
            self.webhooks.wake()
        if job.verdict is StartVerdict.RUN:
            if job.webhook:
                data = {"task_id": job.task_id, "status": "RUNNING", "attempt": job.attempts}
                self.webhooks.send(job, WebhookEvent.START, data)
            record = InFlight(job, Phase.ALONE if alone else Phase.RUNNING)
            self._hold(record)
            record.run = asyncio.create_task(self._execute(record))
        elif job.verdict is StartVerdict.SUSPECT:
            if self._phases[Phase.WAITING] or job.task_id in self._tasks:
                # One suspect at a time per worker: the others are not kept alive here, so
                # they go idle again and the next worker to claim takes them. Recovery from a
                # crash is shared instead of queued behind one worker.
                return False
            self._hold(InFlight(job, Phase.WAITING))
            log.info(
                "task was started before and never finished (its worker died, or the "
                "start's reply was lost): it will run alone",
                extra={"task_id": job.task_id},
            )
        elif job.verdict is StartVerdict.DEAD:
            metrics.tasks_dead_lettered.inc()
            metrics.tasks_finished.labels("FAILED").inc()
            log.warning("task dead-lettered", extra={"task_id": job.task_id})
        elif job.verdict is StartVerdict.CANCELLED:
            metrics.tasks_finished.labels("CANCELLED").inc()
        elif job.verdict is StartVerdict.EXPIRED:
            metrics.tasks_finished.labels("EXPIRED").inc()
            log.info("task expired before it started", extra={"task_id": job.task_id})
        return True

    async def _run_suspect_alone(self) -> None:
        suspect = next(r for r in self._tasks.values() if r.phase is Phase.WAITING)
        delivery = Delivery(entry_id=suspect.job.entry_id, task_id=suspect.job.task_id)
        [job] = await self.queue.start(self.consumer, [delivery], alone=True)
        self._let_go(suspect)
        self._took([job], alone=True)

    # -- running one task

    async def _execute(self, record: InFlight) -> None:
        job = record.job
        finish: Finish | None = None
        try:
            with self._span(job):
                finish = await self._run_handler(record)
        finally:
            if finish is None:  # another worker took the entry over; its outcome is theirs
                self._let_go(record)
            else:
                if job.webhook and finish.outcome in _FINAL:
                    # Recorded with the outcome, in the same script call (see finish.lua).
                    data = _completed(finish, time.time())
                    message = self.webhooks.message(job, WebhookEvent.COMPLETED, data)
                    finish = dataclasses.replace(finish, webhook=message)
                self._move(record, Phase.WRITING)
                self._outbox.add(finish)
                self._flush_needed.set()
            self._slot_free.set()

    async def _run_handler(self, record: InFlight) -> Finish | None:
        job = record.job
        ended: BaseException | None = None
        result = b""
        reports = self._reports_of(job)
        # Set and cleared with no await between them and the call's own: a stop for the
        # timeout always lands in the call, never in the reports' close below.
        self._timeouts.started(record)
        try:
            output = await self._call(job.prompt, job.params, reports or _NO_REPORTS)
            result = orjson.dumps(output)
        except asyncio.CancelledError as error:
            if record.stop is None:
                raise  # not cancelled by this worker: the process is going down
            ended = TimeoutError() if record.stop is StopReason.TIMED_OUT else error
        except Exception as error:
            if not isinstance(error, TimeoutError | RetryableError):
                log.warning("task failed: %s", type(error).__name__, extra={"task_id": job.task_id})
            ended = error
        self._timeouts.ended(record)
        if record.stop is StopReason.TIMED_OUT:
            # The cancel was this worker's timeout, handled here, as asyncio.timeout() does.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        if reports is not None and reports.used:
            # Every report lands before the outcome, so an event stream misses none of them.
            await reports.close(_REPORTS_GRACE)
        elif reports is not None:
            reports.close_unused()
        finish = decide(job, ended, result, record.stop, self.settings)
        _telemetry.run_ended(finish, ended, max(0.0, time.time() - job.started_at))
        return finish

    def _reports_of(self, job: Job) -> TaskReports | None:
        if not self.runner.takes_context:
            return None
        send = self._send_reports
        if job.webhook and job.webhook_events & {"progress", "output"}:
            send = functools.partial(self._report_and_deliver, job)
        return TaskReports(job.task_id, send, asyncio.get_running_loop(), self._reports_lock)

    def _send_reports(self, task_id: str, reports: Sequence[Report]) -> Awaitable[bool]:
        return self.queue.report(self.consumer, task_id, reports)

    async def _report_and_deliver(self, job: Job, task_id: str, reports: Sequence[Report]) -> bool:
        stored = await self.queue.report(self.consumer, task_id, reports)
        if stored:
            for report in reports:
                if report.kind == "progress":
                    data = {"task_id": task_id, "fraction": report.fraction, "message": report.text}
                    self.webhooks.send(job, WebhookEvent.PROGRESS, data)
                else:
                    data = {"task_id": task_id, "chunk": report.text}
                    self.webhooks.send(job, WebhookEvent.OUTPUT, data)
        return stored

    def _span(self, job: Job) -> contextlib.AbstractContextManager[Any]:
        if not self.tracing:
            return contextlib.nullcontext()
        s = self.settings
        return _telemetry.task_span(
            self._tracer, job, queue=s.queue_key, group=s.consumer_group, consumer=self.consumer
        )

    # -- writing outcomes

    async def _flush_loop(self) -> None:
        retries: set[asyncio.Task[None]] = set()
        try:
            while True:
                await _first(
                    self._flush_needed.wait(),
                    self._closed.wait(),
                    at_most=self._outbox.next_retry_in(),
                )
                if self._closed.is_set():
                    return
                self._flush_needed.clear()
                # A refusing partition's retry runs beside the others' flushes, never in them.
                for batch in self._outbox.retries_due(_FINISH_BATCH):
                    retry = asyncio.create_task(self._flush(batch))
                    retries.add(retry)
                    retry.add_done_callback(self._retry_ended)
                    retry.add_done_callback(retries.discard)
                while batch := self._outbox.due(_FINISH_BATCH):
                    await self._flush(batch)
        finally:
            for retry in retries:
                retry.cancel()

    def _retry_ended(self, retry: asyncio.Task[None]) -> None:
        if not retry.cancelled() and retry.exception() is not None:
            error = retry.exception()
            self.fail(f"a retry of outcomes ended with {type(error).__name__}: {error}", error)

    async def _flush(self, batch: Sequence[Finish]) -> None:
        """Write one batch of outcomes; what a partition refuses waits in the outbox."""
        try:
            verdicts = await self.queue.finish(self.consumer, batch)
        except QueueUnavailable as error:
            # The outcomes stay buffered and their entries unacknowledged: nothing is lost,
            # and a worker that dies meanwhile leaves them to be reclaimed. Only the
            # partitions that refused wait; the others' outcomes are written.
            redis_errors.labels("finish").inc()
            if isinstance(error, PartitionsUnavailable):
                pairs = list(zip(batch, error.partial, strict=True))
                written = [(f, v) for f, v in pairs if v is not None]
                refused: Sequence[Finish] = [f for f, v in pairs if v is None]
                self._outbox.written(f for f, _ in written)
                self._record([f for f, _ in written], [v for _, v in written])
                refusing = set(error.failed)
            else:
                refused = batch
                refusing = self._outbox.partitions_of(batch)
            self._unsure.update(f.job.task_id for f in refused)
            self._outbox.refused(refusing, error)
            self._flush_needed.set()  # wakes the loop to wait for the next retry
            return
        self._outbox.written(batch)
        self._record(batch, verdicts)

    def _record(self, batch: Sequence[Finish], verdicts: Sequence[FinishVerdict]) -> None:
        now = time.time()
        run_seconds: list[float] = []
        end_to_end_seconds: list[float] = []
        finished_as: dict[str, int] = {}
        for finish, verdict in zip(batch, verdicts, strict=True):
            job = finish.job
            record = self._tasks.get(job.task_id)
            if record is not None and record.job is job:
                del self._tasks[job.task_id]
                self._phases[Phase.WRITING] -= 1
            sent_before = job.task_id in self._unsure
            self._unsure.discard(job.task_id)
            if verdict is FinishVerdict.STALE and sent_before:
                verdict = FinishVerdict.WRITTEN  # written by the call that failed after it ran
            if verdict is not FinishVerdict.WRITTEN:
                _not_written(job, verdict)
                continue
            if finish.outcome is Outcome.RETRY:
                metrics.tasks_retried.inc()
            elif finish.outcome is not Outcome.RELEASE:
                if finish.webhook is not None:
                    self.webhooks.wake()
                status = finish.outcome.value
                finished_as[status] = finished_as.get(status, 0) + 1
                run_seconds.append(max(0.0, now - job.started_at))
                end_to_end_seconds.append(max(0.0, now - job.created_at))
        # Counted once per batch: three observations and a count, task by task, cost about
        # 2.5 µs of a no-op task's CPU (see observe_each).
        for status, count in finished_as.items():
            metrics.tasks_finished_as[status].inc(count)
        observe_each(metrics.task_run, run_seconds)
        observe_each(metrics.task_end_to_end, end_to_end_seconds)
        self._slot_free.set()  # written outcomes make room for more (see _free_slots)
        metrics.tasks_in_flight.set(self.in_flight)

    # -- keeping entries, reclaiming others', housekeeping

    async def _keep_alive_loop(
        self, queue: TaskQueue, worker_loop: asyncio.AbstractEventLoop | None
    ) -> None:
        """Keep held entries fresh, through `queue`; run on the sidecar's thread when
        `worker_loop` is given, in which case the replies are acted on back on that loop."""
        interval = min(self.settings.claim_idle / 3, 10.0)
        while not self._closed_flag.is_set():
            await _sleep_or_flag(interval, self._closed_flag)
            if self.loop_blocked_for() > self.settings.task_timeout + self.settings.liveness_grace:
                # The loop is hung and /healthz fails: the entries go idle and another worker
                # reclaims them, as it would once this one is restarted. (A thread left running
                # past its timeout holds no entry: its task's outcome is written already.)
                continue
            # Every task held is kept alive: a suspect waiting to run alone and an outcome not
            # yet written are still this worker's. A copy: the worker's loop may be changing
            # the dict on the other thread (dict.copy is atomic under the GIL).
            held = list(self._tasks.copy().values())
            if self.loop_blocked_for():
                # A handler holds the loop, so TASK_TIMEOUT cannot fire there: a run past it
                # is let go idle, and another worker reclaims the task and runs it alone.
                overdue = time.time() - self.settings.task_timeout
                held = [
                    r for r in held if not (r.phase in _RUN_PHASES and r.job.started_at < overdue)
                ]
            for start in range(0, len(held), _FINISH_BATCH):
                chunk = held[start : start + _FINISH_BATCH]
                try:
                    replies = await queue.keep_alive(self.consumer, [r.job for r in chunk])
                except QueueUnavailable as error:
                    redis_errors.labels("keep_alive").inc()
                    log.warning("redis cannot keep entries alive (%s); retrying", error)
                    if not isinstance(error, PartitionsUnavailable):
                        break
                    # The other partitions' entries were kept alive: act on their replies.
                    chunk = [r for r, a in zip(chunk, error.partial, strict=True) if a is not None]
                    replies = [a for a in error.partial if a is not None]
                if worker_loop is None:
                    self._on_keep_alive_replies(chunk, replies)
                else:
                    worker_loop.call_soon_threadsafe(self._on_keep_alive_replies, chunk, replies)

    def _on_keep_alive_replies(self, chunk: Sequence[InFlight], replies: Sequence[str]) -> None:
        for record, reply in zip(chunk, replies, strict=True):
            self._on_keep_alive(record, reply)

    def _on_keep_alive(self, record: InFlight, reply: str) -> None:
        if reply == "ok":
            return
        if record.phase is Phase.WAITING:
            if reply == "lost":
                self._let_go(record)  # another worker runs it now
            return
        if record.phase is Phase.WRITING or record.run is None or record.stop is not None:
            return  # no run to stop: its outcome is on its way, or it is stopping already
        if reply == "cancel":
            record.stop = StopReason.CANCELLED
            log.info("cancelling at the client's request", extra={"task_id": record.job.task_id})
        else:
            record.stop = StopReason.LOST
            log.warning(
                "entry no longer this worker's (another worker took it over, or a restart of "
                "Redis without persistence took its stream): run stopped",
                extra={"task_id": record.job.task_id},
            )
        record.run.cancel()

    # -- the loop's health, watched from the sidecar

    async def _beat_loop(self) -> None:
        pause = min(0.1, self.settings.loop_block_limit / 4)
        while not self._closed.is_set():
            self.loop_beat = time.monotonic()
            await _sleep_or_stop(pause, self._closed)

    def loop_blocked_for(self) -> float:
        """Seconds since the worker's loop last ran its heartbeat; 0 while it runs freely."""
        lag = time.monotonic() - self.loop_beat
        return lag if lag > self.settings.loop_block_limit else 0.0

    def hung(self) -> str | None:
        """Why this worker cannot recover without a restart, if it cannot: its loop blocked,
        or a synchronous handler call running, past TASK_TIMEOUT + LIVENESS_GRACE."""
        limit = self.settings.task_timeout + self.settings.liveness_grace
        now = time.monotonic()
        if self.sidecar is not None and not self._closed_flag.is_set():
            blocked = now - self.loop_beat
            if blocked > limit:
                return (f"the event loop has been blocked for {blocked:.0f}s by handler "
                        f"{self.runner.name}, past TASK_TIMEOUT + LIVENESS_GRACE")  # fmt: skip
        oldest = self.runner.oldest_call_started()
        if oldest is not None and now - oldest > limit:
            return (f"a call of handler {self.runner.name} has run for {now - oldest:.0f}s, "
                    "past TASK_TIMEOUT + LIVENESS_GRACE")  # fmt: skip
        return None

    async def _watch_loop(self) -> None:
        """On the sidecar: log and count each time the worker's loop is blocked too long."""
        limit = self.settings.loop_block_limit
        name = self.runner.name
        blocked_since: float | None = None
        while not self._closed_flag.is_set():
            await _sleep_or_flag(min(0.25, limit / 2), self._closed_flag)
            beat = self.loop_beat
            lag = time.monotonic() - beat
            if blocked_since is None and lag > limit:
                blocked_since = beat
                metrics.event_loop_blocks.labels(name).inc()
                log.warning(
                    "handler %s has blocked the event loop for %.1fs (limit %gs, LOOP_BLOCK_LIMIT)",
                    name, lag, limit,
                    extra={"handler": name, "task_ids": self._running_ids()},
                )  # fmt: skip
            elif blocked_since is not None and beat > blocked_since:
                metrics.event_loop_block.labels(name).observe(beat - blocked_since)
                log.info("the event loop runs again after %.1fs", beat - blocked_since)
                blocked_since = None

    async def _maintenance_loop(self) -> None:
        claim_every = max(self.settings.claim_idle / 2, 0.5)
        next_claim = time.monotonic() + claim_every
        next_trim = time.monotonic() + _TRIM_INTERVAL
        backoff = _Backoff()
        pause = _RETRY_PROMOTE_INTERVAL
        while not self._stopping.is_set():
            await _sleep_or_stop(pause, self._stopping)
            now = time.monotonic()
            try:
                await self.queue.promote_due_retries(limit=1000)
                free = self._free_slots()
                if now >= next_claim and free > 0 and not self._stopping.is_set():
                    next_claim = now + claim_every
                    claimed = await self.queue.claim_idle(
                        self.consumer, free, avoid=self._outbox.refusing()
                    )
                    # Entries of tasks held here went idle because keep-alive could not reach
                    # Redis, or are a second entry of one task: claiming them only reset their
                    # idle time, and they must not start a second run (_begin skips them).
                    taken = await self._begin(claimed)
                    if taken:
                        metrics.tasks_reclaimed.inc(taken)
                        log.info("reclaimed %d idle entries", taken)
                if now >= next_trim:
                    next_trim = now + _TRIM_INTERVAL
                    await self.queue.trim()
                backoff.reset()
                pause = _RETRY_PROMOTE_INTERVAL
            except QueueUnavailable as error:
                redis_errors.labels("maintenance").inc()
                log.warning("redis cannot run maintenance (%s); retrying", error)
                pause = max(_RETRY_PROMOTE_INTERVAL, backoff.next())

    # -- stopping

    async def _drain(self) -> None:
        grace = self.settings.shutdown_grace
        deadline = time.monotonic() + grace
        runs = self._runs()
        if runs:
            await asyncio.wait([r.run for r in runs if r.run is not None], timeout=grace)
        runs = self._runs()
        if runs:
            # Past the grace: hand the rest back to the queue at once instead of leaving them
            # for CLAIM_IDLE, and never write a half-finished result.
            log.warning("grace of %gs over: releasing %d tasks", grace, len(runs))
            for record in runs:
                if record.stop is None:
                    record.stop = StopReason.RELEASED
                if record.run is not None:
                    record.run.cancel()
            await asyncio.wait([r.run for r in runs if r.run is not None], timeout=1)
        flush_until = max(deadline, time.monotonic()) + 2.0
        while self._phases[Phase.WRITING] and time.monotonic() < flush_until:
            self._flush_needed.set()
            await asyncio.sleep(0.05)
        if self._phases[Phase.WRITING]:
            log.warning(
                "%d outcomes unwritten; their tasks will be reclaimed",
                self._phases[Phase.WRITING],
            )

    def _running_ids(self) -> list[str]:
        """The ids of the tasks whose handler runs; safe to call from the sidecar's thread."""
        held = self._tasks.copy().values()
        return [r.job.task_id for r in held if r.phase in (Phase.RUNNING, Phase.ALONE)]

    def _runs(self) -> list[InFlight]:
        return [r for r in self._tasks.values() if r.phase in (Phase.RUNNING, Phase.ALONE)]


def _not_written(job: Job, verdict: FinishVerdict) -> None:
    """Say why an outcome was not written: rare, and otherwise invisible."""
    if verdict is FinishVerdict.LOST:
        log.warning(
            "outcome not written: another worker holds the task now (it took the entry over)",
            extra={"task_id": job.task_id},
        )
    else:
        log.info("outcome not written: the task had ended already", extra={"task_id": job.task_id})


def _completed(finish: Finish, now: float) -> dict[str, Any]:
    """A `completed` webhook's data: the task as GET would show it, in short."""
    job = finish.job
    return {
        "task_id": job.task_id,
        "status": finish.outcome.value,
        "result": orjson.loads(finish.result) if finish.outcome is Outcome.DONE else None,
        "error": finish.error,
        "attempts": job.attempts,
        "started_at": job.started_at,
        "finished_at": now,
    }


class _Backoff:
    """Capped exponential backoff with jitter, for reconnecting to Redis."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        self.attempt += 1
        return random.uniform(0, min(self.cap, self.base * 2**self.attempt))

    def reset(self) -> None:
        self.attempt = 0


async def _first(*waits: Awaitable[Any], at_most: float | None = None) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    _, pending = await asyncio.wait(tasks, timeout=at_most, return_when=asyncio.FIRST_COMPLETED)
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


async def _sleep_or_flag(seconds: float, flag: threading.Event) -> None:
    """Sleep `seconds`, or less once `flag` is set: it is checked every 0.1 s."""
    deadline = time.monotonic() + seconds
    while not flag.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.1))


async def _sleep_or_stop(seconds: float, stopping: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
