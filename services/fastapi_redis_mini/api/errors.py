"""The api's error vocabulary, and the one place that turns errors into HTTP answers.

Every error answer has the shape {"error": {"code", "message"}}; no traceback ever reaches a
client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..core.queue import QueueState, QueueUnavailable
from ..core.telemetry import metrics

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra_headers = headers or {}


class TaskNotFoundError(ServiceError):
    status_code, code = 404, "task_not_found"

    def __init__(self) -> None:
        super().__init__("no task with this id")


class UnauthorizedError(ServiceError):
    status_code, code = 401, "unauthorized"
    headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": 'Bearer realm="tasks"'}

    def __init__(self) -> None:
        super().__init__("a valid API key is required (Authorization: Bearer KEY or X-API-Key)")


class BacklogFullError(ServiceError):
    status_code, code = 429, "backlog_full"
    headers: ClassVar[Mapping[str, str]] = {"Retry-After": "5"}


class RateLimitedError(ServiceError):
    """The API key is over SUBMIT_RATE_PER_KEY; headers say when to retry."""

    status_code, code = 429, "rate_limited"


class TooManyUnfinishedError(ServiceError):
    status_code, code = 429, "too_many_unfinished"
    headers: ClassVar[Mapping[str, str]] = {"Retry-After": "5"}


class TooManyStoredBytesError(ServiceError):
    status_code, code = 429, "too_many_stored_bytes"


class TooManyWaitsError(ServiceError):
    status_code, code = 429, "too_many_waits"
    headers: ClassVar[Mapping[str, str]] = {"Retry-After": "1"}


class TooManyStreamsError(ServiceError):
    """The API key holds EVENTS_MAX_STREAMS_PER_KEY event streams open already."""

    status_code, code = 429, "too_many_streams"
    headers: ClassVar[Mapping[str, str]] = {"Retry-After": "5"}


class UnsupportedMediaTypeError(ServiceError):
    status_code, code = 415, "unsupported_media_type"


class InvalidFieldError(ServiceError):
    """A value that parsed but breaks a limit; the message starts with the field's name."""

    status_code, code = 422, "invalid_request"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


class ConflictError(ServiceError):
    status_code, code = 409, "conflict"


class IdempotencyKeyReusedError(ServiceError):
    """The Idempotency-Key was first sent with another body (as Stripe answers it)."""

    status_code, code = 422, "idempotency_key_reused"


# Every state in which Redis cannot take a request: the error code a client sees, and the
# seconds after which retrying is worth it (Retry-After). A state that lasts longer (loading a
# large data set, a failover) asks for a longer wait.
UNAVAILABLE: Mapping[QueueState, tuple[str, int]] = {
    QueueState.UNREACHABLE: ("redis_unavailable", 2),
    QueueState.OUT_OF_MEMORY: ("redis_out_of_memory", 5),
    QueueState.READ_ONLY: ("redis_read_only", 2),
    QueueState.CANNOT_PERSIST: ("redis_cannot_persist", 5),
    QueueState.LOADING: ("redis_loading", 5),
    QueueState.BUSY: ("redis_busy", 2),
    QueueState.MASTER_DOWN: ("redis_master_down", 2),
    QueueState.TRY_AGAIN: ("redis_try_again", 1),
    QueueState.CLUSTER_DOWN: ("redis_cluster_down", 2),
    QueueState.UNBLOCKED: ("redis_unblocked", 1),
    QueueState.NO_REPLICAS: ("redis_no_replicas", 2),
}


CLIENT_CLOSED_REQUEST = 499


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _describe_validation(errors: Sequence[Any]) -> str:
    parts = []
    for item in errors:
        if item.get("type") == "json_invalid":
            parts.append(
                f"body: not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})"
            )
            continue
        # ("body", "params", "duration") reads params.duration, ("query", "wait") wait.
        location = [str(part) for part in item.get("loc", ())]
        if location and location[0] in ("body", "query", "header", "path"):
            location = location[1:]
        field = ".".join(location) or "body"
        parts.append(f"{field}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, error: ServiceError) -> JSONResponse:
        headers = {**error.headers, **error.extra_headers}
        return error_response(error.status_code, error.code, error.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe_validation(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return error_response(
            error.status_code,
            code.get(error.status_code, "http_error"),
            str(error.detail),
            error.headers,
        )

    @app.exception_handler(QueueUnavailable)
    async def _redis_down(_: Request, error: QueueUnavailable) -> JSONResponse:
        metrics.redis_errors.labels("api").inc()
        log.warning("redis cannot serve the request: %s", error)
        code, retry_after = UNAVAILABLE[error.state]
        return error_response(
            503, code, f"the task store cannot serve requests now ({error.state.value}); "
            "retry shortly", {"Retry-After": str(retry_after)},
        )  # fmt: skip

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> Response:
        # The client left mid-request: nothing to answer, and no fault of the service, so no
        # ERROR and no 5xx for anyone to trip the availability alerts with. 499 is nginx's
        # code for it, and only the metrics see it.
        log.info("client disconnected before its request was read: %s", request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
