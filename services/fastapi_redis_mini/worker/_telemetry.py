"""What the worker tells about each task run: a span that follows OpenTelemetry's messaging
conventions, its error status, and one log line once the outcome is decided."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ..core.queue import Finish, Job, Outcome

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
    log.info(
        "task finished: %s, attempt %d, %.3fs%s",
        finish.outcome.value,
        job.attempts,
        run_seconds,
        f", {reason}" if reason else "",
        extra={
            "task_id": job.task_id,
            "status": finish.outcome.value,
            "attempt": job.attempts,
            "duration_seconds": round(run_seconds, 3),
            "reason": reason,
        },
    )
