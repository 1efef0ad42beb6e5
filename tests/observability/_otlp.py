"""A minimal OTLP/HTTP trace receiver on loopback, so tests can see the spans services export."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from fastapi_redis_mini_harness.polling import poll

MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int = 0  # opentelemetry.proto.trace.v1.Span.SpanKind
    status_code: int = 0  # opentelemetry.proto.trace.v1.Status.StatusCode: 2 is ERROR
    events: tuple[str, ...] = ()
    attributes: dict[str, str | int] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.service}:{self.name} {self.trace_id}/{self.span_id}<-{self.parent_span_id}"


class Collector:
    """Spans received so far, safe to read while exporters keep posting."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

    def add(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    attribute.value.string_value
                    for attribute in resource_spans.resource.attributes
                    if attribute.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            status_code=span.status.code,
                            events=tuple(event.name for event in span.events),
                            attributes={
                                a.key: a.value.string_value or a.value.int_value
                                for a in span.attributes
                            },
                        )
                    )
        with self._lock:
            self._spans.extend(received)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, accept: Callable[[ReceivedSpan], bool], timeout: float, what: str
    ) -> ReceivedSpan:
        """The first span `accept` takes; fail listing everything received after `timeout`."""

        def received() -> str:
            spans = "\n  ".join(str(span) for span in self.spans) or "(none)"
            return f"no span {what}; received:\n  {spans}"

        return poll(
            lambda: next((span for span in self.spans if accept(span)), None),
            timeout,
            0.2,
            received,
        )


class _Receiver(ThreadingHTTPServer):
    collector: Collector


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        if not 0 <= length <= MAX_BODY_BYTES:
            self.send_error(413)
            return
        body = self.rfile.read(length)
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.collector.add(request)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per export would drown the test's own output


@contextmanager
def run_collector() -> Iterator[Collector]:
    """Receive OTLP/HTTP protobuf traces on a free loopback port until the block ends."""
    server = _Receiver(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    server.collector = Collector(f"http://127.0.0.1:{port}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield server.collector
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
