"""Logs: JSON lines in production, readable lines for `make run`.

Every record carries the current trace and span ids when a span is active, and the task id
when the caller passes `extra={"task_id": ...}`. Prompts, results and secrets are never logged
at INFO.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime

from opentelemetry import trace
from pythonjsonlogger.orjson import OrjsonFormatter


class _JsonFormatter(OrjsonFormatter):
    """JSON lines encoded by orjson: the worker writes one per task, so each one must be cheap.

    The time is ISO 8601 with milliseconds and the UTC offset, so lines from any zone sort and
    compare. The local date, time and offset are looked up once per second rather than per
    record: a zone's offset only changes on a whole second, so it is exact across DST changes.
    """

    # One tuple, replaced whole, so a thread never pairs one second with another's text.
    _stamp: tuple[int, str, str] = (-1, "", "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        cached, clock, offset = self._stamp
        if second != cached:
            local = datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")
            clock, offset = local[:19], local[19:]
            self._stamp = (second, clock, offset)
        return f"{clock}.{int((record.created - second) * 1000):03d}{offset}"


class _TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created).astimezone().strftime("%H:%M:%S%z")


class _TraceContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def configure_logging(log_format: str, level: str, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceContext())
    if log_format == "json":
        handler.setFormatter(
            _JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
                static_fields={"service": service},
            )
        )
    else:
        handler.setFormatter(
            _TextFormatter(f"%(asctime)s {service:<6} %(levelname)-7s %(message)s")
        )
    # No line shows the thread or process, so records need not look them up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
