"""POST /tasks, GET /tasks/{task_id}, DELETE /tasks/{task_id}.

The two routes every client calls in a loop, submit and read, are RequestRoutes: they parse
their own input, which their OpenAPI entries declare through openapi_extra. DELETE keeps
FastAPI's parameter handling.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel

from ...core.models import (
    ErrorPublic,
    TaskCreate,
    TaskPublic,
    TaskStatus,
    TaskSubmitted,
    request_signature,
)
from ...core.queue import CancelOutcome, SubmitOutcome, SubmitQuota, TaskQueue, TaskRecord
from ...core.telemetry.tracing import current_traceparent
from .. import metrics
from .._limits import TASK_ID, check_idempotency_key, check_task
from ..deps import RequestRoute, body_schema, json_body, queue_of, scope_of, settings_of
from ..errors import (
    BacklogFullError,
    ConflictError,
    InvalidFieldError,
    RateLimitedError,
    TaskNotFoundError,
    TooManyUnfinishedError,
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorPublic} for code in (401, 404, 413, 415, 422, 429, 503)
}
router = APIRouter(prefix="/tasks", tags=["tasks"], responses=_ERRORS)
_SUBMITTED = {outcome: metrics.tasks_submitted.labels(outcome.value) for outcome in SubmitOutcome}
_REJECTED = metrics.tasks_submitted.labels("rejected")


class BacklogGate:
    """Refuses new work while the consumer group's lag is above MAX_BACKLOG.

    The lag is read at most once a second per process, so the check costs one Redis call a
    second rather than one per request.
    """

    def __init__(self, limit: int, refresh_seconds: float = 1.0) -> None:
        self.limit = limit
        self.refresh_seconds = refresh_seconds
        self._lag = 0
        self._read_at = float("-inf")

    async def check(self, queue: TaskQueue) -> None:
        if self.limit <= 0:
            return
        now = time.monotonic()
        if now - self._read_at >= self.refresh_seconds:
            self._read_at = now
            self._lag = (await queue.stats()).lag
        if self._lag > self.limit:
            _REJECTED.inc()
            raise BacklogFullError(
                f"backlog of {self._lag} tasks is above MAX_BACKLOG={self.limit}; retry later"
            )


def _public(record: TaskRecord) -> TaskPublic:
    return TaskPublic.model_validate(record, from_attributes=True)


def _answer(
    model: BaseModel,
    status_code: int = status.HTTP_200_OK,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The route's answer, serialised once by pydantic; FastAPI passes a Response through."""
    return Response(model.model_dump_json(), status_code, headers, "application/json")


def _rate_limit_fields(quota: SubmitQuota | None) -> dict[str, str] | None:
    """The RateLimit-Policy and RateLimit fields of draft-ietf-httpapi-ratelimit-headers-09."""
    if quota is None:
        return None
    return {
        "RateLimit-Policy": f'"submits";q={quota.limit};w={quota.window_seconds}',
        "RateLimit": f'"submits";r={quota.remaining};t={quota.reset_seconds}',
    }


_IDEMPOTENCY_HEADER = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "Repeating a submit with the same key answers with the first task.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
    ]
}


async def submit_task(request: Request) -> Response:
    """Queue a task, or answer at once from the result cache when an identical one finished."""
    # Who asks comes first: an unauthenticated body is never read, let alone parsed.
    scope = scope_of(request)
    task = await json_body(request, TaskCreate)
    settings = settings_of(request)
    queue = queue_of(request)
    idempotency_key = request.headers.get("idempotency-key")
    check_task(task, settings)
    check_idempotency_key(idempotency_key)
    gate: BacklogGate = request.app.state.backlog_gate
    await gate.check(queue)
    return await _submit(request, queue, task, scope, idempotency_key)


router.add_api_route(
    "",
    submit_task,
    methods=["POST"],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskSubmitted,
    responses={200: {"model": TaskSubmitted, "description": "Answered from the result cache"}},
    openapi_extra={**body_schema(TaskCreate), **_IDEMPOTENCY_HEADER},
    route_class_override=RequestRoute,
)


_MAX_TAKEOVERS = 3


async def _submit(
    request: Request,
    queue: TaskQueue,
    task: TaskCreate,
    scope: str,
    idempotency_key: str | None,
    replacing: str | None = None,
    takeovers: int = 0,
) -> Response:
    submitted = await queue.submit(
        task,
        signature=request_signature(task),
        scope=scope,
        idempotency_key=idempotency_key,
        traceparent=current_traceparent() if request.app.state.tracing else "",
        replacing=replacing,
    )
    _SUBMITTED[submitted.outcome].inc()
    fields = _rate_limit_fields(submitted.quota)
    if submitted.outcome is SubmitOutcome.RATE_LIMITED:
        retry_after = max(1, submitted.quota.reset_seconds if submitted.quota else 1)
        raise RateLimitedError(
            f"over SUBMIT_RATE_PER_KEY for this API key; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after), **(fields or {})},
        )
    if submitted.outcome is SubmitOutcome.TOO_MANY_UNFINISHED:
        raise TooManyUnfinishedError(
            f"this API key has {settings_of(request).max_unfinished_per_key} tasks that are "
            "not final yet (MAX_UNFINISHED_PER_KEY); retry once some finish",
            headers=fields,
        )
    if submitted.outcome is SubmitOutcome.CACHED:
        metrics.cache_hits.inc()
        return _answer(
            TaskSubmitted(
                task_id=submitted.task_id,
                status=TaskStatus.DONE,
                cached=True,
                result=submitted.result,
            ),
            headers=fields,
        )
    if submitted.outcome is SubmitOutcome.DUPLICATE:
        record = await queue.get(submitted.task_id, scope)
        if record is not None:
            return _answer(
                TaskSubmitted(
                    task_id=record.task_id,
                    status=record.status,
                    cached=record.cached,
                    result=record.result,
                ),
                headers=fields,
            )
        # The key outlived its task (the key is set to expire with its task, so only a key
        # written under a longer RESULT_EXPIRY can): take the key over for a new task. The
        # takeover is atomic, so of N such requests one creates the task and the rest find it.
        if takeovers >= _MAX_TAKEOVERS:
            raise ConflictError("Idempotency-Key points at tasks that keep vanishing; retry")
        return await _submit(
            request, queue, task, scope, idempotency_key, submitted.task_id, takeovers + 1
        )
    metrics.cache_misses.inc()
    return _answer(
        TaskSubmitted(task_id=submitted.task_id, status=TaskStatus.PENDING, cached=False),
        status.HTTP_202_ACCEPTED,
        fields,
    )


MAX_WAIT = 30.0
_GET_PARAMETERS = {
    "parameters": [
        {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}},
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": "Seconds to wait for the task to finish (long-poll).",
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT},
        },
    ]
}


def _wait_seconds(request: Request) -> float | None:
    value = request.query_params.get("wait")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidFieldError("wait", "must be a number of seconds") from None
    if not 0 < seconds <= MAX_WAIT:  # also refuses nan
        raise InvalidFieldError("wait", f"must be more than 0 and at most {MAX_WAIT:g} seconds")
    return seconds


async def get_task(request: Request) -> Response:
    """Read a task's status, result and timestamps; with ?wait=S, wait up to S for it to end."""
    task_id: str = request.path_params["task_id"]
    wait = _wait_seconds(request)
    queue = queue_of(request)
    scope = scope_of(request)
    if not TASK_ID.fullmatch(task_id):
        raise TaskNotFoundError()
    record = await (queue.wait(task_id, scope, wait) if wait else queue.get(task_id, scope))
    if record is None:
        raise TaskNotFoundError()
    return _answer(_public(record))


router.add_api_route(
    "/{task_id}",
    get_task,
    methods=["GET"],
    response_model=TaskPublic,
    openapi_extra=_GET_PARAMETERS,
    route_class_override=RequestRoute,
)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskPublic,
    responses={409: {"model": ErrorPublic}},
)
async def cancel_task(task_id: str, request: Request) -> Response:
    """Cancel a task: a PENDING one never runs; a RUNNING one is stopped by its worker."""
    queue = queue_of(request)
    scope = scope_of(request)
    if not TASK_ID.fullmatch(task_id):
        raise TaskNotFoundError()
    outcome = await queue.cancel(task_id, scope)
    if outcome is CancelOutcome.NOT_FOUND:
        raise TaskNotFoundError()
    record = await queue.get(task_id, scope)
    if record is None:
        raise TaskNotFoundError()
    if outcome is CancelOutcome.FINAL:
        raise ConflictError(f"task is already {record.status.value}")
    return _answer(_public(record), status.HTTP_202_ACCEPTED)
