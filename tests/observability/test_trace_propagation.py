"""A submit's trace continues in the worker: real processes exporting OTLP to a test receiver."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from fastapi_redis_mini_harness.processes import Process, start_api, start_worker

from ._otlp import Collector, ReceivedSpan, run_collector
from ._services import ready

pytestmark = pytest.mark.slow

API_SERVICE = "fastapi-redis-mini-api"
WORKER_SERVICE = "fastapi-redis-mini-worker"
SPAN_WAIT = 30.0
CONSUMER = Span.SpanKind.SPAN_KIND_CONSUMER
UNSET, ERROR = Status.StatusCode.STATUS_CODE_UNSET, Status.StatusCode.STATUS_CODE_ERROR
MESSAGING = (
    "messaging.system",
    "messaging.operation.type",
    "messaging.destination.name",
    "messaging.consumer.group.name",
    "task.id",
)


@dataclass
class Traced:
    api: Process
    worker: Process
    collector: Collector


@pytest.fixture
def traced(redis_url: str) -> Iterator[Traced]:
    with run_collector() as collector:
        endpoint = collector.endpoint
        # OTEL_BSP_SCHEDULE_DELAY: export within 0.1 s instead of the default 5 s.
        api = start_api(
            redis_url,
            wait=False,
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        worker = None
        try:
            ready(api, "/readyz")
            worker = start_worker(
                redis_url,
                wait=False,
                OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                OTEL_BSP_SCHEDULE_DELAY="100",
                LOG_FORMAT="json",
                MAX_RETRIES="0",
            )
            ready(worker, "/healthz")
            yield Traced(api, worker, collector)
        finally:
            for service in (api, worker):
                if service is not None:
                    service.close()


def run_task(
    api: Process, headers: dict[str, str], params: dict[str, object] | None = None
) -> tuple[str, str]:
    """Submit a task and wait for it; returns its id and final status."""
    with httpx.Client(base_url=api.base_url, timeout=30.0) as client:
        prompt = f"trace {uuid.uuid4().hex}"
        task = {"prompt": prompt, "params": params or {}}
        submitted = client.post("/tasks", json=task, headers=headers)
        assert submitted.status_code == 202, submitted.text
        task_id: str = submitted.json()["task_id"]
        finished = client.get(f"/tasks/{task_id}", params={"wait": 20}).json()
        assert finished["status"] in ("DONE", "FAILED"), finished
        return task_id, str(finished["status"])


def submit_span(collector: Collector, accept_parent: str) -> ReceivedSpan:
    """The api's server span for POST /tasks whose parent is `accept_parent` ("" for a root)."""
    return collector.wait_for(
        lambda span: (
            span.service == API_SERVICE
            and span.name == "POST /tasks"
            and span.parent_span_id == accept_parent
        ),
        SPAN_WAIT,
        f"POST /tasks from {API_SERVICE} with parent {accept_parent!r}",
    )


def run_span(collector: Collector, trace_id: str) -> ReceivedSpan:
    return collector.wait_for(
        lambda span: (
            span.service == WORKER_SERVICE
            and span.name == "process task_stream"
            and span.trace_id == trace_id
        ),
        SPAN_WAIT,
        f"process task_stream from {WORKER_SERVICE} in trace {trace_id}",
    )


def test_worker_span_is_a_child_of_the_submitting_request_span(traced: Traced) -> None:
    assert run_task(traced.api, headers={})[1] == "DONE"

    request = submit_span(traced.collector, accept_parent="")
    run = run_span(traced.collector, request.trace_id)

    assert run.trace_id == request.trace_id
    assert run.parent_span_id == request.span_id


def test_worker_span_follows_the_messaging_conventions_and_a_done_run_is_no_error(
    traced: Traced,
) -> None:
    task_id, status = run_task(traced.api, headers={})
    assert status == "DONE"
    run = run_span(traced.collector, submit_span(traced.collector, accept_parent="").trace_id)
    assert run.kind == CONSUMER
    assert {key: run.attributes[key] for key in MESSAGING} == {
        "messaging.system": "redis",
        "messaging.operation.type": "process",
        "messaging.destination.name": "task_stream",
        "messaging.consumer.group.name": "workers",
        "task.id": task_id,
    }
    assert str(run.attributes["messaging.message.id"]).count("-") == 1  # a stream entry id
    assert (run.status_code, run.events) == (UNSET, ())


def test_a_client_trace_continues_through_the_api_into_the_worker(traced: Traced) -> None:
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    assert (
        run_task(traced.api, headers={"traceparent": f"00-{client_trace}-{client_span}-01"})[1]
        == "DONE"
    )

    request = submit_span(traced.collector, accept_parent=client_span)
    run = run_span(traced.collector, client_trace)

    assert request.trace_id == client_trace
    assert run.parent_span_id == request.span_id


def test_worker_log_lines_carry_the_task_id_and_its_trace(traced: Traced) -> None:
    task_id, status = run_task(traced.api, headers={}, params={"fail": True})
    assert status == "FAILED"

    request = submit_span(traced.collector, accept_parent="")
    run = run_span(traced.collector, request.trace_id)
    records = [json.loads(line) for line in traced.worker.log.splitlines() if line.startswith("{")]
    about_task = [record for record in records if record.get("task_id") == task_id]

    assert about_task, f"no worker log line names task {task_id}:\n{traced.worker.log}"
    for record in about_task:
        assert record.get("trace_id") == run.trace_id, record
        assert record.get("span_id") == run.span_id, record
    # The run failed: its span says so, with the exception, and one line says how it ended.
    assert run.status_code == ERROR
    assert "exception" in run.events
    (finished,) = [r for r in about_task if r["message"].startswith("task finished")]
    assert (finished["status"], finished["attempt"]) == ("FAILED", 1), finished
    assert finished["reason"] == "TaskFailedError: simulated failure requested by params.fail"
    assert finished["duration_seconds"] >= 0, finished
    assert finished["level"] == "INFO"
