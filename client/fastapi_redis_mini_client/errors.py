"""What the client raises: the service's error codes as exception types, and task outcomes.

An error answer maps by HTTP status and code together. A code this client does not know yet
still gets the class of its status (a new 503 code is a ServiceUnavailableError, a new 429
code a RateLimitedError), so handlers written against the status classes keep working, and
retries keep applying to it.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .models import Task


class TaskClientError(Exception):
    """Everything this package raises derives from this.

    Each one pickles with its attributes, so it can cross to another process (multiprocessing,
    concurrent.futures): Exception's own pickling would call __init__ with the message alone.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    kind: type[TaskClientError], args: tuple[Any, ...], attributes: dict[str, Any]
) -> TaskClientError:
    error = kind.__new__(kind)
    error.args = args
    error.__dict__.update(attributes)
    return error


class APIError(TaskClientError):
    """The service answered with an error: {"error": {"code", "message"}} and a status.

    `attempts` counts the requests sent, retries included; `retry_after` is the answer's
    Retry-After in seconds, when it had one.
    """

    retryable = False

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.attempts = attempts


class RequestRefusedError(APIError):
    """A 4xx answer: this request will not succeed as it is."""


class UnauthorizedError(RequestRefusedError):
    """401: no API key, or one the service does not know."""


class NotFoundError(RequestRefusedError):
    """404 for a path the service does not serve (a wrong base URL)."""


class TaskNotFoundError(NotFoundError):
    """404 task_not_found: no such task, it expired, or it belongs to another API key."""


class ConflictError(RequestRefusedError):
    """409: the task is already final, so it cannot be cancelled."""


class PayloadTooLargeError(RequestRefusedError):
    """413: the body is above the service's MAX_BODY_BYTES."""


class UnsupportedMediaTypeError(RequestRefusedError):
    """415: the body is not JSON."""


class InvalidRequestError(RequestRefusedError):
    """422: the message starts with the name of the field at fault."""


class IdempotencyKeyReusedError(InvalidRequestError):
    """422 idempotency_key_reused: the key was first sent with another body; the message
    names the key's task. A new request needs a new key."""


class RateLimitedError(RequestRefusedError):
    """429 (rate_limited: over SUBMIT_RATE_PER_KEY); retried while its Retry-After is short."""

    retryable = True


class BacklogFullError(RateLimitedError):
    """429 backlog_full: the queue holds more than the service's MAX_BACKLOG."""


class TooManyUnfinishedError(RateLimitedError):
    """429 too_many_unfinished: this API key has MAX_UNFINISHED_PER_KEY tasks not final yet."""


class ServerError(APIError):
    """A 5xx answer."""


class InternalServerError(ServerError):
    """500 internal_error."""


class ServiceUnavailableError(ServerError):
    """503 (and a gateway's 502 or 504): the service cannot serve now; retried."""

    retryable = True


class RedisUnavailableError(ServiceUnavailableError):
    """503 redis_unavailable: the task store does not answer."""


class ServiceUnreachableError(TaskClientError):
    """No answer at all (connection refused or reset, timeout) after every retry."""


class PoolTimeoutError(TaskClientError, TimeoutError):
    """No free connection in this client's own pool in time: the service was never asked.

    Only raised when a pool timeout was set (on an `http_client=` of your own); raise the
    pool's `limits=`, or bound the calls in flight, e.g. with wait_all's concurrency.
    """

    def __init__(self, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: no free connection in the client's pool in time")


class ClientClosedError(TaskClientError, RuntimeError):
    """A call on a client after its close()."""


class UnexpectedResponseError(TaskClientError):
    """A success status whose body is not a task: the base URL may point at another server."""

    def __init__(self, status_code: int, body: str) -> None:
        super().__init__(f"{status_code} answer that is not a task: {body[:200]!r}")
        self.status_code = status_code
        self.body = body


class TaskEndedError(TaskClientError):
    """A task ended without a result; `task` is its final state."""

    def __init__(self, task: Task, message: str) -> None:
        super().__init__(message)
        self.task = task


class TaskFailedError(TaskEndedError):
    """The task ended FAILED; `task.error` holds the handler's error."""

    def __init__(self, task: Task) -> None:
        super().__init__(task, f"task {task.task_id} failed: {task.error}")


class TaskCancelledError(TaskEndedError):
    """The task ended CANCELLED."""

    def __init__(self, task: Task) -> None:
        super().__init__(task, f"task {task.task_id} was cancelled")


class TaskExpiredError(TaskEndedError):
    """The task ended EXPIRED: it was not started by its deadline, and never ran."""

    def __init__(self, task: Task) -> None:
        super().__init__(task, f"task {task.task_id} expired before it started")


class WaitTimeoutError(TaskClientError, TimeoutError):
    """The task was not final within the timeout; `task` is the last state read, if any.

    From `run`, `task_id` is None when the timeout passed before the submit was answered (its
    __cause__ says why, e.g. a RedisUnavailableError); no task may exist then, or one may.
    """

    def __init__(self, task_id: str | None, timeout: float, task: Task | None) -> None:
        if task_id is None:
            message = f"task not submitted within {timeout:g} s"
        else:
            message = f"task {task_id} not finished after {timeout:g} s"
        super().__init__(message)
        self.task_id = task_id
        self.timeout = timeout
        self.task = task


_BY_CODE: dict[tuple[int, str], type[APIError]] = {
    (401, "unauthorized"): UnauthorizedError,
    (404, "not_found"): NotFoundError,
    (404, "task_not_found"): TaskNotFoundError,
    (409, "conflict"): ConflictError,
    (413, "payload_too_large"): PayloadTooLargeError,
    (415, "unsupported_media_type"): UnsupportedMediaTypeError,
    (422, "invalid_request"): InvalidRequestError,
    (422, "idempotency_key_reused"): IdempotencyKeyReusedError,
    (429, "backlog_full"): BacklogFullError,
    (429, "rate_limited"): RateLimitedError,
    (429, "too_many_unfinished"): TooManyUnfinishedError,
    (500, "internal_error"): InternalServerError,
    (503, "redis_unavailable"): RedisUnavailableError,
}
_BY_STATUS: dict[int, type[APIError]] = {
    401: UnauthorizedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidRequestError,
    429: RateLimitedError,
    500: InternalServerError,
    502: ServiceUnavailableError,
    503: ServiceUnavailableError,
    504: ServiceUnavailableError,
}


def error_class(status_code: int, code: str) -> type[APIError]:
    """The most specific class for a status and code; an unknown code gets its status's."""
    found = _BY_CODE.get((status_code, code)) or _BY_STATUS.get(status_code)
    if found is not None:
        return found
    if 400 <= status_code < 500:
        return RequestRefusedError
    if status_code >= 500:
        return ServerError
    return APIError


def error_from_response(response: httpx.Response, *, attempts: int = 1) -> APIError:
    """The exception for an error answer, whatever its body (a proxy may answer in HTML)."""
    code, message = f"http_{response.status_code}", response.reason_phrase
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, TypeError, KeyError):
        if response.text:
            message = response.text[:200]
    return error_class(response.status_code, code)(
        response.status_code,
        code,
        message,
        retry_after=retry_after_seconds(response.headers.get("retry-after")),
        attempts=attempts,
    )


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds, from either of its forms; nonsense counts as absent."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None
    return seconds if seconds >= 0 else None
