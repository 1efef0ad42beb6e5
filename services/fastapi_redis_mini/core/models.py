"""The task model: statuses, request and response schemas, and the request signature."""

from __future__ import annotations

import hashlib
import re
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

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED})


class TaskCreate(BaseModel):
    """What a client submits. Unknown top-level fields are refused; params are free-form."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The input text of the task.")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Handler options, checked with the Params model of the handler. The "
        "built-in handler reads duration, fail, retryable and model; other keys pass.",
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

        A request without a webhook leaves both webhook fields out, so it hashes as it did
        before webhooks existed, and its cached results stay found."""
        exclude = {"webhook", "webhook_events"} if self.webhook is None else None
        return canonical_json(self.model_dump(mode="json", exclude=exclude))


class TaskSubmitted(BaseModel):
    """The answer to a submit: a queued task, or a result served from the cache."""

    task_id: TaskId
    status: TaskStatus
    cached: bool
    result: Any | None = None


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
