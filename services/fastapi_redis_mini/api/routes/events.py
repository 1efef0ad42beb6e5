"""GET /tasks/{task_id}/events: a task's status, progress and output as Server-Sent Events.

The stream is read from Redis, not from this process's memory, so any api replica serves
any task, and a client that reconnects anywhere resumes where it was. Each event's id is
`<entry>/<status>`: the last report sent (its entry id in the task's event stream) and the
last status sent. `Last-Event-ID` resumes after that report, sending a status again only if
it changed, so nothing is lost or repeated (except reports the capped stream has dropped).

A stream ends with one of `done`, `failed` or `cancelled`, carrying the task as GET shows
it; resuming past that answers 204, which tells an EventSource to stop reconnecting. It
wakes on the task's start, reports and end (pub/sub), and re-reads the task every
EVENTS_HEARTBEAT seconds anyway, when it also sends a keep-alive comment. One read takes at
most _READ_COUNT reports, so a connection holds a bounded amount whatever the task wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass

import orjson
from fastapi import APIRouter, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from ...core.models import ErrorResponse, Task, TaskId, TaskStatus, is_task_id
from ...core.queue import QueueUnavailable, TaskEvent, TaskQueue
from .. import metrics
from ..deps import RequestRoute, operation_id, parses, tenant_of, validated
from ..errors import InvalidFieldError, TaskNotFoundError, TooManyStreamsError
from ..state import api_state

log = logging.getLogger(__name__)

_READ_COUNT = 100
# How soon an EventSource reconnects after a dropped connection (the SSE `retry` field).
_RETRY_MS = 1000
_FINAL_EVENTS = {
    TaskStatus.DONE: "done",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "cancelled",
}
_EVENT_ID = re.compile(r"^(\d{1,20}-\d{1,20})/([A-Z]{4,9})$")


class EventsHeaders(BaseModel):
    last_event_id: str | None = Field(
        default=None,
        alias="Last-Event-ID",
        description="The id of the last event received: the stream resumes after it.",
    )


@dataclass(slots=True)
class Cursor:
    """Where a client is: the last report it got, and the last status it was sent."""

    entry_id: str = "0-0"
    status: TaskStatus | None = None

    @classmethod
    def parse(cls, value: str | None) -> Cursor:
        if value is None:
            return cls()
        match = _EVENT_ID.fullmatch(value.strip())
        if match is None or match[2] not in TaskStatus.__members__:
            raise InvalidFieldError(
                "Last-Event-ID", "not an id this stream sent (<entry id>/<status>)"
            )
        return cls(match[1], TaskStatus(match[2]))

    @property
    def event_id(self) -> str:
        return f"{self.entry_id}/{self.status.value if self.status else 'PENDING'}"


router = APIRouter(
    prefix="/tasks",
    tags=["tasks"],
    responses={code: {"model": ErrorResponse} for code in (401, 404, 422, 429, 503)},
    route_class=RequestRoute,
    generate_unique_id_function=operation_id,
)


class StreamCounter:
    """Event streams open per API key in this process, under EVENTS_MAX_STREAMS_PER_KEY."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    @contextlib.contextmanager
    def held(self, scope: str, limit: int) -> Iterator[None]:
        count = self.open.get(scope, 0)
        if limit and count >= limit:
            raise TooManyStreamsError(
                f"this API key has {count} event streams open (EVENTS_MAX_STREAMS_PER_KEY); "
                "close one or retry later"
            )
        self.open[scope] = count + 1
        try:
            yield
        finally:
            left = self.open[scope] - 1
            if left:
                self.open[scope] = left
            else:
                del self.open[scope]


streams = StreamCounter()


def _event(kind: str, event_id: str, data: bytes) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), kind.encode(), data)


def _report(cursor: Cursor, event: TaskEvent) -> bytes:
    cursor.entry_id = event.entry_id
    if event.kind == "progress":
        data = {"fraction": event.fraction, "message": event.text, "attempt": event.attempt}
    else:
        data = {"chunk": event.text, "attempt": event.attempt}
    return _event(event.kind, cursor.event_id, orjson.dumps(data))


def _status(cursor: Cursor, task: Task) -> bytes:
    cursor.status = task.status
    if task.status.is_final:
        return _event(_FINAL_EVENTS[task.status], cursor.event_id, task.model_dump_json().encode())
    return _event("status", cursor.event_id, orjson.dumps({"status": task.status.value}))


@router.get(
    "/{task_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Events: status, progress, output, then done, failed or cancelled",
        },
        204: {"description": "Resumed past the final event: nothing more will come"},
    },
)
@parses(task_id=TaskId, headers=EventsHeaders)
async def task_events(request: Request) -> Response:
    """Follow a task as Server-Sent Events until it ends; Last-Event-ID resumes a stream."""
    state = api_state(request)
    task_id: str = request.path_params["task_id"]
    request.state.metrics_route_suffix = metrics.LONG_POLL_SUFFIX
    scope = tenant_of(request, state.api_keys)
    if not is_task_id(task_id):
        raise TaskNotFoundError()
    header = request.headers.get("last-event-id")
    if header is not None:
        validated(EventsHeaders, {"Last-Event-ID": header}, "header")
    cursor = Cursor.parse(header)
    # One report is enough to learn whether the task exists, before the stream starts.
    if await state.queue.read_events(task_id, scope, cursor.entry_id, 1) is None:
        raise TaskNotFoundError()
    if cursor.status is not None and cursor.status.is_final:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    # Held from here until the response ends, however it ends (see _HeldStream).
    # Without API_KEYS every client shares scope "" and so one allowance, as with the other
    # per-key limits: a bound on what one process holds open either way.
    held = streams.held(scope, state.settings.events_max_streams_per_key)
    held.__enter__()
    heartbeat = state.settings.events_heartbeat

    async def body() -> AsyncGenerator[bytes, None]:
        yield b"retry: %d\n\n" % _RETRY_MS
        async for chunk in _follow(state.queue, task_id, scope, cursor, heartbeat):
            yield chunk

    return _HeldStream(body(), held)


class _HeldStream(StreamingResponse):
    """A stream that gives back its place under the cap and closes its generator (leaving
    its task's watch) when the response ends: finished, failed, or its client gone, even
    before the generator ever ran."""

    def __init__(
        self, body: AsyncGenerator[bytes, None], held: contextlib.AbstractContextManager[None]
    ) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            # No proxy may buffer or transform the stream (nginx reads X-Accel-Buffering).
            headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
        )
        self._body = body
        self._held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._held.__exit__(None, None, None)
            await self._body.aclose()


async def _follow(
    queue: TaskQueue, task_id: str, scope: str, cursor: Cursor, heartbeat: float
) -> AsyncIterator[bytes]:
    """The stream's events, from the cursor on, until the task's final status."""
    async with queue.follow(task_id) as changed:
        # Read once the subscription listens, so no wake-up falls between a read and a wait.
        while True:
            changed.clear()
            try:
                read = await queue.read_events(task_id, scope, cursor.entry_id, _READ_COUNT)
            except QueueUnavailable as error:
                # The client reconnects with its Last-Event-ID; no traceback reaches it.
                log.warning("event stream ended: %s", error, extra={"task_id": task_id})
                return
            if read is None:
                return  # the task expired while it was followed
            task = read.task
            if not task.status.is_final and task.status is not cursor.status:
                yield _status(cursor, task)
            for event in read.events:
                yield _report(cursor, event)
            if len(read.events) == _READ_COUNT:
                continue  # more to read at once
            if task.status.is_final:
                yield _status(cursor, task)
                return
            try:
                await asyncio.wait_for(changed.wait(), heartbeat)
            except TimeoutError:
                yield b": keep-alive\n\n"
