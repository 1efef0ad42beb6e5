"""What the worker tells about each task run: a span that follows OpenTelemetry's messaging
conventions, its error status, and one log line once the outcome is decided.

The lines of the runs that end in one turn of the event loop go to logging together, in one
record that the service's formatters write as one line per run (core/telemetry/logging.py).
A record's trip through logging (the record, the logger, the handler and its lock, the write)
cost about 15 us, as much as the rest of the line and more than a tenth of the worker's CPU
per no-op task; a line now costs its fields, its time and its encoding. Each line keeps its
own time, fields and trace ids, so it reads as it did when it was a record of its own. Lines
not yet handed over when the process ends are handed over at exit (flush_lines).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import time
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ..core.queue import Finish, Job, Outcome
from ..core.telemetry.logging import BATCHED, Batched

log = logging.getLogger(__name__)

# OpenTelemetry lists no value for Redis Streams; for an unlisted system the conventions ask
# for its own name.
MESSAGING_SYSTEM = "redis"


def task_span(
    tracer: trace.Tracer, job: Job, *, queue: str, group: str, consumer: str
) -> AbstractContextManager[Span]:
    """The CONSUMER span of one run, a child of the span that submitted the task."""
    parent = propagate.extract({"traceparent": job.traceparent} if job.traceparent else {})
    attributes: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": queue,
        "messaging.consumer.group.name": group,
        "messaging.message.id": job.entry_id,
        "messaging.client.id": consumer,
        "task.id": job.task_id,
        "task.attempt": job.attempts,
    }
    return tracer.start_as_current_span(
        f"process {queue}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        # The runner turns what a handler raised into an outcome; run_ended records it.
        record_exception=False,
        set_status_on_exception=False,
    )


def run_ended(finish: Finish | None, raised: BaseException | None, run_seconds: float) -> None:
    """Report a run whose outcome is decided, inside its span so the line carries its ids.

    The span turns ERROR, with the exception recorded, when the run failed; a retried run
    failed too. A cancelled or released run did not fail: the client or the worker's
    shutdown stopped it. Every outcome but a release (handed back unfinished at shutdown,
    reported by the next run) gets one INFO line: status, attempt, duration and reason.
    """
    if finish is None or finish.outcome is Outcome.RELEASE:
        return
    job, reason = finish.job, finish.error or ""
    if finish.outcome in (Outcome.FAILED, Outcome.RETRY):
        span = trace.get_current_span()
        if raised is not None:
            span.record_exception(raised)
        span.set_status(Status(StatusCode.ERROR, reason or finish.outcome.value))
    if not log.isEnabledFor(logging.INFO):
        return
    status = finish.outcome.value
    fields: dict[str, Any] = {
        "task_id": job.task_id,
        "status": status,
        "attempt": job.attempts,
        "duration_seconds": round(run_seconds, 3),
        "reason": reason,
    }
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        fields["trace_id"] = format(context.trace_id, "032x")
        fields["span_id"] = format(context.span_id, "016x")
    message = f"task finished: {status}, attempt {job.attempts}, {run_seconds:.3f}s"
    _lines.add(time.time(), f"{message}, {reason}" if reason else message, fields)


def flush_lines() -> None:
    """Hand the lines not yet logged to logging now (before an exit that skips atexit)."""
    _lines.flush()


class _Lines:
    """The runs' lines waiting for the end of this turn of the event loop."""

    def __init__(self) -> None:
        self._pending: Batched = []
        self._scheduled = False
        # The flush runs in a context of its own, not in the span of the run that scheduled it.
        self._context = contextvars.Context()

    def add(self, created: float, message: str, fields: dict[str, Any]) -> None:
        self._pending.append((created, message, fields))
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to wait for (a run ended outside one): at once
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush, context=self._context)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        if pending:
            log.info("%d task runs finished", len(pending), extra={BATCHED: pending})


_lines = _Lines()
atexit.register(_lines.flush)
