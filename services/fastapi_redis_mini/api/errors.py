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
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.redis_queue import RedisUnavailable
from ..core.telemetry import metrics

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class UnsupportedMediaTypeError(ServiceError):
    status_code, code = 415, "unsupported_media_type"


class InvalidFieldError(ServiceError):
    """A value that parsed but breaks a limit; the message starts with the field's name."""

    status_code, code = 422, "invalid_request"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


class ConflictError(ServiceError):
    status_code, code = 409, "conflict"


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
        location = [str(p) for p in item.get("loc", ()) if p != "body"]
        field = ".".join(location) or "body"
        parts.append(f"{field}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, error: ServiceError) -> JSONResponse:
        return error_response(error.status_code, error.code, error.message, error.headers)

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

    async def _redis_down(_: Request, error: Exception) -> JSONResponse:
        metrics.redis_errors.labels("api").inc()
        log.warning("redis unavailable: %s", type(error).__name__)
        return error_response(
            503, "redis_unavailable", "the task store is unavailable; retry shortly",
            {"Retry-After": "2"},
        )  # fmt: skip

    for error_type in RedisUnavailable:
        app.add_exception_handler(error_type, _redis_down)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
