"""Following a task's events (GET /tasks/{id}/events, Server-Sent Events), with resumption.

`Follower` holds everything but the I/O: the request to send, the parsing of the stream's
lines, and the decision after a dropped connection. The sync and async clients drive it. A
dropped connection, a 503 or a 429 is retried with the client's RetryPolicy and resumed with
`Last-Event-ID`, so the events come once each and in order; the count of failures starts
again with every event received.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from ._core import Call, Options, RetryPolicy
from .errors import ServiceUnreachableError, WaitTimeoutError, error_from_response
from .models import Task

FINAL_EVENTS = frozenset({"done", "failed", "cancelled"})
# The service sends a keep-alive comment every EVENTS_HEARTBEAT seconds (15 by default): a
# read that hears nothing for four of them is a dead connection.
READ_TIMEOUT = 60.0


@dataclass(frozen=True)
class TaskEvent:
    """One event of a task's stream.

    kind: `status` ({"status"}), `progress` ({"fraction", "message", "attempt"}), `output`
    ({"chunk", "attempt"}), or the final `done`, `failed` or `cancelled`, whose data is the
    task as GET shows it. id: what `Last-Event-ID` resumes after.
    """

    kind: str
    id: str
    data: dict[str, Any]

    @property
    def is_final(self) -> bool:
        return self.kind in FINAL_EVENTS

    @property
    def task(self) -> Task | None:
        """The task, for a final event."""
        return Task.from_json(self.data) if self.is_final else None

    @property
    def fraction(self) -> float | None:
        """The progress, for a progress event."""
        return float(self.data["fraction"]) if self.kind == "progress" else None

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "id": self.id, "data": self.data}


@dataclass
class Follower:
    """One follow of one task's stream, across as many connections as it takes."""

    task_id: str
    retry: RetryPolicy
    last_event_id: str | None = None
    timeout: float | None = None  # seconds from now after which WaitTimeoutError
    failures: int = 0
    ended: bool = False
    deadline: float | None = field(init=False, default=None)
    _fields: dict[str, str] = field(default_factory=dict)
    _data: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout

    def request(self, http: httpx.Client | httpx.AsyncClient, options: Options) -> httpx.Request:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        self._fields, self._data = {}, []
        request = Call("GET", f"/tasks/{quote(self.task_id, safe='')}/events", headers=headers)
        built = request.build(http, options)
        read = READ_TIMEOUT if self.deadline is None else max(self.deadline - time.monotonic(), 0)
        built.extensions["timeout"] = {**built.extensions["timeout"], "read": min(read, 60.0)}
        return built

    def opened(self, response: httpx.Response) -> bool:
        """Whether to read this answer's stream; False when the stream is over (204). An error
        answer raises, after `response.read()` by the caller, through `refused`."""
        if response.status_code == 204:
            self.ended = True
            return False
        return True

    def refused(self, response: httpx.Response) -> float:
        """The delay before trying again after an error answer, or raise its APIError."""
        error = error_from_response(response)
        if not error.retryable:
            raise error
        return self._again(error, error.retry_after)

    def dropped(self, error: httpx.TransportError | None) -> float:
        """The delay before reconnecting after a connection ended without the final event."""
        ended = ServiceUnreachableError("the event stream ended before the task did")
        return self._again(error or ended, None)

    def _again(self, error: Exception, retry_after: float | None) -> float:
        self.failures += 1
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeoutError(self.task_id, self.timeout or 0.0, None) from error
        if self.failures >= self.retry.attempts:
            raise error
        return self.retry.delay(self.failures, retry_after, random.random)

    def line(self, text: str) -> TaskEvent | None:
        """Feed one line of the stream; the event it completes, if any."""
        if text.startswith(":"):
            return None  # a comment: the keep-alive
        if text:
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            else:
                self._fields[name] = value
            return None
        fields, data = self._fields, self._data
        self._fields, self._data = {}, []
        if "event" not in fields or not data:
            return None  # the `retry:` preamble, or an empty dispatch
        event = TaskEvent(fields["event"], fields.get("id", ""), json.loads("\n".join(data)))
        if event.id:
            self.last_event_id = event.id
        self.failures = 0
        if event.is_final:
            self.ended = True
        return event

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeoutError(self.task_id, self.timeout or 0.0, None)
