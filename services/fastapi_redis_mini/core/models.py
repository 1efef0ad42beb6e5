"""The task model: statuses, request and response schemas, and the request signature."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .webhooks import WebhookEvent

# A UUID4 in hex, after its partition's number and a dash when QUEUE_PARTITIONS is above 1
# (core/redis/keys.py). The api answers 404, not 422, for an id that does not match: it names
# no task.
TASK_ID_PATTERN = r"^(?:[0-9]{1,3}-)?[0-9a-f]{32}$"
TaskId = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]
is_task_id = re.compile(TASK_ID_PATTERN).fullmatch


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"  # not started by its deadline; it never ran

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.EXPIRED}
)


class Priority(StrEnum):
    """The lane a task waits in; workers prefer higher lanes."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# Highest first: the order workers prefer the lanes in.
PRIORITIES: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)

# When and in which lane a task runs, not what it computes: left out of the request signature,
# so the cache and single-flight treat two requests that differ only here as one, and the
# signature of a request without them is what it was before they existed.
SCHEDULING_FIELDS = {"priority", "delay_seconds", "run_at", "deadline_seconds"}


class TaskCreate(BaseModel):
    """What a client submits. Unknown top-level fields are refused; params are free-form."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The input text of the task.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Handler options, checked with the Params model of the handler. The "
        "built-in handler reads duration, fail, retryable and model; other keys pass.",
    )
    priority: Priority | None = Field(
        default=None,
        description="The lane the task waits in: high, normal (the default) or low. Workers "
        "prefer higher lanes; PRIORITY_HIGH_KEYS may restrict high to some API keys.",
    )
    delay_seconds: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Start no sooner than this many seconds after the submit.",
    )
    run_at: datetime | None = Field(
        default=None,
        description="Start no sooner than this time (ISO 8601 with a time zone, or Unix "
        "seconds). Not together with delay_seconds.",
    )
    deadline_seconds: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="A task not started within this many seconds of when it was due ends as "
        "EXPIRED and never runs.",
    )

    webhook: str | None = Field(
        default=None,
        max_length=2048,
        description="An http(s) URL to POST signed deliveries to (Standard Webhooks); only "
        "public addresses, unless the service allows the host.",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None,
        max_length=4,
        description="What to deliver: any of start, progress, output, completed (the "
        "default: completed only).",
    )

    @cached_property
    def canonical(self) -> bytes:
        """The request as canonical JSON: what is stored, and what the signature hashes.

        Built by hand rather than with model_dump(exclude=...), which costs twice as much on
        the submit path: prompt and params, and the webhook fields only when a webhook is
        given, so a request without one hashes as it did before webhooks existed and its
        cached results stay found. Scheduling fields are not part of it."""
        body: dict[str, Any] = {"params": self.params, "prompt": self.prompt}
        if self.webhook is not None:
            body["webhook"] = self.webhook
            body["webhook_events"] = (
                None if self.webhook_events is None else [e.value for e in self.webhook_events]
            )
        return canonical_json(body)

    @property
    def lane(self) -> Priority:
        return self.priority or Priority.NORMAL


class TaskSubmitted(BaseModel):
    """The answer to a submit: a queued task, or a result served from the cache."""

    task_id: TaskId
    status: TaskStatus
    cached: bool
    result: Any | None = None
    coalesced: bool = Field(
        default=False,
        description="True when an identical request of the same API key was already queued "
        "or running: task_id is that task, and no second one was made.",
    )


class Task(BaseModel):
    """A task: its status, its result or error, and when it was created, started and ended."""

    # One model for what the store holds and what clients see. The docstring above is the
    # schema's description; what clients must not see is excluded here, field by field, so
    # no copy of the model can forget it: `scope`, the tenant of the API key that submitted
    # the task, checked on every read, is left out of the JSON and of the schema.
    task_id: TaskId
    status: TaskStatus
    scope: str = Field(default="", exclude=True)
    result: Any | None = None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    progress: float | None = Field(
        default=None, description="The latest progress its handler reported, from 0 to 1."
    )
    progress_message: str | None = Field(
        default=None, description="The message that came with that progress."
    )
    priority: Priority = Priority.NORMAL
    run_at: float | None = Field(
        default=None, description="When a delayed task becomes due (Unix seconds)."
    )
    deadline_at: float | None = Field(
        default=None, description="A task not started by then ends as EXPIRED (Unix seconds)."
    )


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error answer has this shape."""

    error: ErrorBody


def canonical_json(value: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8: the same request always gives the same bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def request_signature(request: TaskCreate) -> str:
    """sha256 of the canonical JSON of the request body; the result cache is keyed by it."""
    return hashlib.sha256(request.canonical).hexdigest()
