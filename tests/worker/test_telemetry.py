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
from fastapi_redis_mini.worker import _telemetry

JOB = Job(entry_id="1700000000000-0", task_id="t1", verdict=StartVerdict.RUN, attempts=2)


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
    (line,) = [r for r in caplog.records if r.getMessage().startswith("task finished")]
    assert line.levelno == logging.INFO
    assert line.getMessage() == "task finished: FAILED, attempt 2, 1.500s, timeout after 60s"
    assert (line.status, line.attempt, line.duration_seconds, line.reason) == (  # type: ignore[attr-defined]
        "FAILED",
        2,
        1.5,
        "timeout after 60s",
    )


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
    assert not [r for r in caplog.records if r.getMessage().startswith("task finished")]
