"""Logs: JSON lines in production, readable lines for `make run`.

Every record carries the current trace and span ids when a span is active, and the task id
when the caller passes `extra={"task_id": ...}`. Prompts, results and secrets are never logged
at INFO.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from typing import Any

import orjson
from opentelemetry import trace

# What every LogRecord carries by itself; any other attribute came in through `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


class _JsonFormatter(logging.Formatter):
    """JSON lines encoded by orjson: the worker writes one per task, so each one must be cheap.

    One flat object per record: time, level, logger, message and service, then each `extra`
    field, then the trace ids and any exception or stack as text. It is built in one pass
    over the record, without a general-purpose JSON formatter's renaming and field merging,
    which cost about as much as the rest of the worker's work on a no-op task.

    The time is ISO 8601 with milliseconds and the UTC offset, so lines from any zone sort and
    compare. The local date, time and offset are looked up once per second rather than per
    record: a zone's offset only changes on a whole second, so it is exact across DST changes.
    """

    # One tuple, replaced whole, so a thread never pairs one second with another's text.
    _stamp: tuple[int, str, str] = (-1, "", "")

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        cached, clock, offset = self._stamp
        if second != cached:
            local = datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")
            clock, offset = local[:19], local[19:]
            self._stamp = (second, clock, offset)
        return f"{clock}.{int((record.created - second) * 1000):03d}{offset}"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


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
        handler.setFormatter(_JsonFormatter(service))
    else:
        handler.setFormatter(
            _TextFormatter(f"%(asctime)s {service:<6} %(levelname)-7s %(message)s")
        )
    # No line shows the thread, the process or the calling function, so records need not look
    # them up (the logging docs' "Optimization" section names these switches); finding the
    # caller walks the stack on every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
