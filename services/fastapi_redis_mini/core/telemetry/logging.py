"""Logs: JSON lines in production, readable lines for `make run`.

Every record carries the current trace and span ids when a span is active, and the task id
when the caller passes `extra={"task_id": ...}`. Prompts, results and secrets are never logged
at INFO.
"""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter


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
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
                static_fields={"service": service},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service:<6} %(levelname)-7s %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
