"""POST /tasks, GET /tasks/{task_id}, DELETE /tasks/{task_id}.

The three are RequestRoutes: each parses its own input, with the pydantic models that
`parses` hands FastAPI for their OpenAPI entries. Submit and read are what every client calls
in a loop, and FastAPI's per-request parameter handling would cost more than their Redis
round trip (docs/BENCHMARKS.md); cancel reads the same way as read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel

from ...core.models import (
    ErrorResponse,
    Priority,
    Task,
    TaskCreate,
    TaskId,
    TaskStatus,
    TaskSubmitted,
    is_task_id,
    request_signature,
)
from ...core.queue import CancelOutcome, SubmitOutcome, SubmitQuota
from ...core.telemetry.tracing import current_traceparent
from .. import metrics
from .._limits import ReadQuery, SubmitHeaders, check_task, due_at
from ..deps import (
    RequestRoute,
    json_body,
    operation_id,
    parses,
    tenant_of,
    validated,
)
from ..errors import (
    ConflictError,
    IdempotencyKeyReusedError,
    InvalidFieldError,
    RateLimitedError,
    TaskNotFoundError,
    TooManyStoredBytesError,
    TooManyUnfinishedError,
)
from ..state import ApiState, api_state

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 422, 429, 503)
}
# Only a route that reads a body can find it too large or not JSON.
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (413, 415)
}
router = APIRouter(
    prefix="/tasks",
    tags=["tasks"],
    responses=_ERRORS,
    route_class=RequestRoute,
    generate_unique_id_function=operation_id,
)
_SUBMITTED = {outcome: metrics.tasks_submitted.labels(outcome.value) for outcome in SubmitOutcome}


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


def _idempotency_key(request: Request) -> str | None:
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    return validated(SubmitHeaders, {"Idempotency-Key": value}, "header").idempotency_key


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskSubmitted,
    response_description="Queued",
    responses={
        200: {"model": TaskSubmitted, "description": "Answered from the result cache"},
        **_BODY_ERRORS,
    },
)
@parses(headers=SubmitHeaders, body=TaskCreate)
async def submit_task(request: Request) -> Response:
    """Queue a task, or answer at once from the result cache when an identical one finished."""
    state = api_state(request)
    # Who asks comes first: an unauthenticated body is never read, let alone parsed.
    scope = tenant_of(request, state.api_keys)
    task = await json_body(request, TaskCreate)
    idempotency_key = _idempotency_key(request)
    check_task(task, state.settings, state.check_params, state.webhook_keys.for_scope(scope))
    if task.priority is Priority.HIGH and not state.api_keys.may_submit_high(scope):
        raise InvalidFieldError("priority", "high is not open to this API key")
    due = due_at(task, state.settings)
    await state.backlog.check(state.queue)
    return await _submit(state, task, scope, idempotency_key, due)


_MAX_TAKEOVERS = 3


async def _submit(
    state: ApiState,
    task: TaskCreate,
    scope: str,
    idempotency_key: str | None,
    due: float,
    replacing: str | None = None,
    takeovers: int = 0,
    replacing_in_flight: str | None = None,
) -> Response:
    submitted = await state.queue.submit(
        task,
        signature=request_signature(task),
        scope=scope,
        idempotency_key=idempotency_key,
        traceparent=current_traceparent() if state.tracing else "",
        replacing=replacing,
        due_at=due,
        replacing_in_flight=replacing_in_flight,
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
            f"this API key has {state.settings.max_unfinished_per_key} tasks that are "
            "not final yet (MAX_UNFINISHED_PER_KEY); retry once some finish",
            headers=fields,
        )
    if submitted.outcome is SubmitOutcome.TOO_MANY_STORED_BYTES:
        retry_after = max(1, submitted.retry_after)
        raise TooManyStoredBytesError(
            f"this API key's stored tasks hold {state.settings.max_stored_bytes_per_key} bytes "
            f"(MAX_STORED_BYTES_PER_KEY); retry in {retry_after} s, once some expire",
            headers={"Retry-After": str(retry_after), **(fields or {})},
        )
    if submitted.outcome is SubmitOutcome.IDEMPOTENCY_KEY_REUSED:
        raise IdempotencyKeyReusedError(
            "Idempotency-Key: already used for task "
            f"{submitted.task_id} with another body; use a new key for a new request"
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
        record = await state.queue.get(submitted.task_id, scope)
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
            state, task, scope, idempotency_key, due, submitted.task_id, takeovers + 1
        )
    if submitted.outcome is SubmitOutcome.COALESCED:
        record = await state.queue.get(submitted.task_id, scope)
        if record is not None and not record.status.is_final:
            return _answer(
                TaskSubmitted(task_id=record.task_id, status=record.status, cached=False,
                              coalesced=True),
                status.HTTP_202_ACCEPTED,
                fields,
            )  # fmt: skip
        # The task in flight ended (or expired) since: a final one without a cached result
        # (failed, cancelled) is not an answer to a new request, so take its place.
        if takeovers >= _MAX_TAKEOVERS:
            raise ConflictError("identical requests keep ending as they are submitted; retry")
        return await _submit(
            state, task, scope, idempotency_key, due, replacing, takeovers + 1,
            replacing_in_flight=submitted.task_id,
        )  # fmt: skip
    metrics.cache_misses.inc()
    return _answer(
        TaskSubmitted(task_id=submitted.task_id, status=TaskStatus.PENDING, cached=False),
        status.HTTP_202_ACCEPTED,
        fields,
    )


def _wait_seconds(request: Request) -> float | None:
    value = request.query_params.get("wait")
    if value is None:
        return None
    return validated(ReadQuery, {"wait": value}, "query").wait


@router.get("/{task_id}", response_model=Task)
@parses(task_id=TaskId, query=ReadQuery)
async def get_task(request: Request) -> Response:
    """Read a task's status, result and timestamps; with ?wait=S, wait up to S for it to end."""
    state = api_state(request)
    # Who asks comes first: without a valid key, nothing else is read or answered.
    scope = tenant_of(request, state.api_keys)
    task_id: str = request.path_params["task_id"]
    wait = _wait_seconds(request)
    if wait:
        # Counted and timed apart: a long-poll takes its wait on purpose.
        request.state.metrics_route_suffix = metrics.LONG_POLL_SUFFIX
    if not is_task_id(task_id):
        raise TaskNotFoundError()
    queue = state.queue
    if wait:
        with state.waits.slot(scope):
            task = await queue.wait(task_id, scope, wait)
    else:
        task = await queue.get(task_id, scope)
    if task is None:
        raise TaskNotFoundError()
    return _answer(task)


@router.delete(
    "/{task_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Task,
    response_description="Cancelled, or asked to stop when it is running",
    responses={409: {"model": ErrorResponse}},
)
@parses(task_id=TaskId)
async def cancel_task(request: Request) -> Response:
    """Cancel a task: a PENDING one never runs; a RUNNING one is stopped by its worker."""
    state = api_state(request)
    task_id: str = request.path_params["task_id"]
    scope = tenant_of(request, state.api_keys)
    if not is_task_id(task_id):
        raise TaskNotFoundError()
    queue = state.queue
    outcome = await queue.cancel(task_id, scope)
    if outcome is CancelOutcome.NOT_FOUND:
        raise TaskNotFoundError()
    task = await queue.get(task_id, scope)
    if task is None:
        raise TaskNotFoundError()
    if outcome is CancelOutcome.FINAL:
        raise ConflictError(f"task is already {task.status.value}")
    return _answer(task, status.HTTP_202_ACCEPTED)
