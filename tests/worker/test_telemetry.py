"""A run's span and log line: ERROR with the exception for failed and timed-out runs only."""

from __future__ import annotations

import asyncio
import logging

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fastapi_redis_mini.core.queue import Finish, Job, Outcome, StartVerdict
from fastapi_redis_mini.core.telemetry.logging import BATCHED
from fastapi_redis_mini.worker import _telemetry

JOB = Job(entry_id="1700000000000-0", task_id="t1", verdict=StartVerdict.RUN, attempts=2)


def finished_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, dict[str, object]]]:
    """The `task finished` lines logged: level, message and fields of each."""
    return [
        (record.levelno, message, fields)
        for record in caplog.records
        for _, message, fields in record.__dict__.get(BATCHED) or ()
        if message.startswith("task finished")
    ]


def run(finish: Finish, raised: BaseException | None) -> ReadableSpan:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with _telemetry.task_span(tracer, JOB, queue="task_stream", group="workers", consumer="w-1"):
        _telemetry.run_ended(finish, raised, 1.5)
    (span,) = exporter.get_finished_spans()
    return span


def test_a_timed_out_run_ends_error_with_the_exception_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    span = run(Finish(JOB, Outcome.FAILED, error="timeout after 60s"), TimeoutError())
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "timeout after 60s"
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "TimeoutError"
    ((level, message, fields),) = finished_lines(caplog)
    assert level == logging.INFO
    assert message == "task finished: FAILED, attempt 2, 1.500s, timeout after 60s"
    context = span.get_span_context()
    assert context is not None
    assert fields == {
        "task_id": "t1",
        "status": "FAILED",
        "attempt": 2,
        "duration_seconds": 1.5,
        "reason": "timeout after 60s",
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
    }


def test_a_run_that_will_retry_is_an_error_too() -> None:
    span = run(Finish(JOB, Outcome.RETRY, error="RetryableError: flaky"), RuntimeError("flaky"))
    assert span.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize(
    ("finish", "raised"),
    [
        (Finish(JOB, Outcome.DONE, result=b"{}"), None),
        (Finish(JOB, Outcome.CANCELLED, error="cancelled while running"), asyncio.CancelledError()),
    ],
)
def test_done_and_cancelled_runs_are_no_error(finish: Finish, raised: BaseException | None) -> None:
    span = run(finish, raised)
    assert span.status.status_code is StatusCode.UNSET
    assert span.events == ()


def test_the_span_is_named_and_labelled_by_the_messaging_conventions() -> None:
    span = run(Finish(JOB, Outcome.DONE, result=b"{}"), None)
    assert (span.name, span.kind) == ("process task_stream", SpanKind.CONSUMER)
    assert span.attributes is not None
    assert {
        key: span.attributes[key]
        for key in (
            "messaging.system",
            "messaging.destination.name",
            "messaging.consumer.group.name",
            "messaging.message.id",
            "messaging.client.id",
            "task.attempt",
        )
    } == {
        "messaging.system": "redis",
        "messaging.destination.name": "task_stream",
        "messaging.consumer.group.name": "workers",
        "messaging.message.id": "1700000000000-0",
        "messaging.client.id": "w-1",
        "task.attempt": 2,
    }


def test_a_release_at_shutdown_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    run(Finish(JOB, Outcome.RELEASE), asyncio.CancelledError())
    assert not finished_lines(caplog)


async def test_the_lines_of_runs_ending_in_one_turn_of_the_loop_are_logged_together(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    for attempt in (1, 2, 3):
        job = Job(entry_id="1-0", task_id=f"t{attempt}", verdict=StartVerdict.RUN, attempts=1)
        _telemetry.run_ended(Finish(job, Outcome.DONE, result=b"{}"), None, 0.25)
    assert not finished_lines(caplog), "logged before the loop's turn ended"
    await asyncio.sleep(0)
    batches = [r for r in caplog.records if r.__dict__.get(BATCHED)]
    assert len(batches) == 1
    assert [fields["task_id"] for _, _, fields in finished_lines(caplog)] == ["t1", "t2", "t3"]
    _telemetry.run_ended(Finish(JOB, Outcome.DONE, result=b"{}"), None, 0.25)
    _telemetry.flush_lines()  # as the worker does before an exit that skips atexit
    assert len(finished_lines(caplog)) == 4
