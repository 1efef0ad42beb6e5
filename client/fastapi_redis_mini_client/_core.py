"""What the client does, without doing any I/O: both transports drive these flows.

Each operation is a generator. It yields a `Call` when it needs an HTTP exchange and receives
the httpx.Response (or has the transport's httpx.TransportError thrown in), and yields a
`Sleep` when it needs to wait; its return value is the operation's result. The sync Client
and the AsyncClient differ only in how they carry these out, so request building, retries,
long-poll slicing and the mapping of answers to results and exceptions exist once.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from .errors import (
    APIError,
    ConflictError,
    ServiceUnreachableError,
    TaskCancelledError,
    TaskFailedError,
    UnexpectedResponseError,
    WaitTimeoutError,
    error_from_response,
)
from .models import Task, TaskStatus

log = logging.getLogger("fastapi_redis_mini_client")

T = TypeVar("T")

# The service refuses a long-poll above 30 s (GET /tasks/{id}?wait=S, 0 < S <= 30).
MAX_POLL_SECONDS = 30.0
# Below this, a long-poll slice is not worth a request: the wait has timed out.
MIN_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class Call:
    """One HTTP exchange an operation needs; `long_poll` adds to the read timeout."""

    method: str
    path: str
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    long_poll: float = 0.0

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        timeout = http.timeout
        if self.long_poll:
            read = None if timeout.read is None else timeout.read + self.long_poll
            timeout = httpx.Timeout(
                connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool
            )
        return http.build_request(
            self.method,
            self.path,
            json=self.json,
            headers=dict(self.headers),
            params=dict(self.params),
            timeout=timeout,
        )


@dataclass(frozen=True)
class Sleep:
    seconds: float


Flow = Generator[Call | Sleep, httpx.Response | None, T]


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry 503, 429, gateway errors and connection failures.

    attempts: requests in all, the first included. The delay before retry n is random
    between half and all of backoff * 2**(n-1), capped at backoff_max, and never shorter than
    the answer's Retry-After. An answer whose Retry-After is above retry_after_max is raised
    at once rather than waited out.
    """

    attempts: int = 8
    backoff: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, not {self.attempts}")
        for name in ("backoff", "backoff_max", "retry_after_max"):
            value: float = getattr(self, name)
            if not value >= 0:  # also refuses nan
                raise ValueError(f"RetryPolicy.{name} must be 0 or more, not {value}")

    def delay(self, retry: int, retry_after: float | None, rng: Callable[[], float]) -> float:
        ceiling = min(self.backoff * 2.0 ** (retry - 1), self.backoff_max)
        return max(ceiling * (0.5 + rng() / 2), retry_after or 0.0)


def http_options(base_url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    """The httpx client options both transports use."""
    if not timeout > 0:
        raise ValueError(f"timeout must be more than 0 seconds, not {timeout}")
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url, "headers": headers, "timeout": timeout}


def _task_path(task_id: str) -> str:
    return "/tasks/" + quote(task_id, safe="")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be 0 or more seconds, or None, not {timeout}")


class Core:
    """The operations, as flows. `clock` and `rng` are the monotonic clock and jitter source."""

    def __init__(
        self,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.retry = retry
        self._clock = clock
        self._rng = rng

    def submit(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Flow[Task]:
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping, not {type(params).__name__}")
        # Every submit carries a key, so a retry of a submit whose answer was lost finds the
        # first task instead of creating a second.
        key = idempotency_key or uuid.uuid4().hex
        call = Call(
            "POST",
            "/tasks",
            json={"prompt": prompt, "params": dict(params or {})},
            headers={"Idempotency-Key": key},
        )
        response = yield from self._exchange(call)
        return task_of(response)

    def get(self, task_id: str) -> Flow[Task]:
        response = yield from self._exchange(Call("GET", _task_path(task_id)))
        return task_of(response)

    def wait(self, task_id: str, timeout: float | None) -> Flow[Task]:
        """Long-poll in slices of at most 30 s until the task is final or `timeout` passes."""
        _check_timeout(timeout)
        deadline = None if timeout is None else self._clock() + timeout
        task: Task | None = None
        while True:
            left = MAX_POLL_SECONDS if deadline is None else deadline - self._clock()
            if left < MIN_POLL_SECONDS:
                if task is None:  # a zero timeout still reads the task once
                    task = yield from self.get(task_id)
                if task.is_final:
                    return task
                raise WaitTimeoutError(task_id, timeout or 0.0, task)
            poll = min(left, MAX_POLL_SECONDS)
            call = Call("GET", _task_path(task_id), params={"wait": f"{poll:.3f}"}, long_poll=poll)
            response = yield from self._exchange(call, deadline)
            task = task_of(response)
            if task.is_final:
                return task

    def cancel(self, task_id: str) -> Flow[Task]:
        try:
            response = yield from self._exchange(Call("DELETE", _task_path(task_id)))
        except ConflictError as error:
            # A retried cancel whose first answer was lost finds the task already CANCELLED:
            # that is this call's own doing, not a conflict.
            if error.attempts > 1:
                task = yield from self.get(task_id)
                if task.status is TaskStatus.CANCELLED:
                    return task
            raise
        return task_of(response)

    def run(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Flow[Any]:
        """Submit, wait, and return the result, or raise TaskFailedError/TaskCancelledError."""
        _check_timeout(timeout)
        started = self._clock()
        task = yield from self.submit(prompt, params, idempotency_key)
        if not task.is_final:
            left = None if timeout is None else max(timeout - (self._clock() - started), 0.0)
            task = yield from self.wait(task.task_id, left)
        return outcome(task)

    def _exchange(self, call: Call, deadline: float | None = None) -> Flow[httpx.Response]:
        """Send `call`, retrying what is safe to retry; a 2xx answer or an exception."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = yield call
            except httpx.TransportError as transport_error:
                failure: Exception = transport_error
                retry_after = None
                retryable = True
            else:
                assert response is not None
                if response.is_success:
                    return response
                failure = error_from_response(response, attempts=attempt)
                retry_after = failure.retry_after
                retryable = failure.retryable and (retry_after or 0) <= self.retry.retry_after_max
            delay = self.retry.delay(attempt, retry_after, self._rng)
            late = deadline is not None and self._clock() + delay >= deadline
            if not retryable or attempt >= self.retry.attempts or late:
                if isinstance(failure, APIError):
                    raise failure
                raise ServiceUnreachableError(
                    f"{call.method} {call.path}: no answer in {attempt} attempt(s) ({failure!r})"
                ) from failure
            log.info(
                "%s %s: %s; retry %d of %d in %.1f s",
                call.method,
                call.path,
                failure
                if isinstance(failure, APIError)
                else f"{type(failure).__name__}: {failure}",
                attempt,
                self.retry.attempts - 1,
                delay,
            )
            yield Sleep(delay)


def task_of(response: httpx.Response) -> Task:
    """The task a success answer carries; UnexpectedResponseError for anything else."""
    try:
        return Task.from_json(response.json())
    except (ValueError, KeyError, TypeError) as error:
        raise UnexpectedResponseError(response.status_code, response.text) from error


def outcome(task: Task) -> Any:
    """A final task's result, or the exception its status stands for."""
    if task.status is TaskStatus.FAILED:
        raise TaskFailedError(task)
    if task.status is TaskStatus.CANCELLED:
        raise TaskCancelledError(task)
    return task.result
