"""Logs: JSON lines in production, readable lines for `make run`.

Every record carries the current trace and span ids when a span is active, and the task id
when the caller passes `extra={"task_id": ...}`. Prompts, results and secrets are never logged
at INFO.

A record may also carry several lines at once, in its `extra={BATCHED: [...]}`: each entry is
(time, message, fields) and is written as a line of its own, with the record's level and
logger, exactly as a record of its own would be. The worker hands its per-task lines over this
way (see worker/_telemetry.py): a record's trip through logging costs more than its line.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from typing import Any

import orjson
from opentelemetry import trace

# The `extra` key of a record that carries several lines: a list of (time, message, fields).
BATCHED = "batched_lines"
Batched = list[tuple[float, str, dict[str, Any]]]

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
        return self._time(record.created)

    def _time(self, created: float) -> str:
        second = int(created)
        cached, clock, offset = self._stamp
        if second != cached:
            local = datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")
            clock, offset = local[:19], local[19:]
            self._stamp = (second, clock, offset)
        return f"{clock}.{int((created - second) * 1000):03d}{offset}"

    def format(self, record: logging.LogRecord) -> str:
        batched: Batched | None = record.__dict__.get(BATCHED)
        if batched is not None:
            return "\n".join(self._batched(record, *entry) for entry in batched)
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

    def _batched(
        self, record: logging.LogRecord, created: float, message: str, fields: dict[str, Any]
    ) -> str:
        line: dict[str, Any] = {
            "time": self._time(created),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "service": self.service,
        }
        line.update(fields)
        return orjson.dumps(line, default=str).decode()


class _TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created).astimezone().strftime("%H:%M:%S%z")

    def format(self, record: logging.LogRecord) -> str:
        batched: Batched | None = record.__dict__.get(BATCHED)
        if batched is None:
            return super().format(record)
        # `make run`'s readable lines: each entry as the record it stands for.
        lines = []
        for created, message, fields in batched:
            one = logging.makeLogRecord({**record.__dict__, BATCHED: None, **fields})
            one.msg, one.args, one.created = message, None, created
            lines.append(super().format(one))
        return "\n".join(lines)


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
