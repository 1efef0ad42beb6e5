"""What the client does, without doing any I/O: both transports drive these flows.

Each operation is a generator. It yields a `Call` when it needs an HTTP exchange and receives
the httpx.Response (or has the transport's httpx.TransportError thrown in), and yields a
`Sleep` when it needs to wait; its return value is the operation's result. The sync Client
and the AsyncClient differ only in how they carry these out, so request building, retries,
long-poll slicing and the mapping of answers to results and exceptions exist once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
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
    PoolTimeoutError,
    ServiceUnreachableError,
    TaskCancelledError,
    TaskExpiredError,
    TaskFailedError,
    UnexpectedResponseError,
    WaitTimeoutError,
    error_from_response,
)
from .models import Schedule, Task, TaskStatus

log = logging.getLogger("fastapi_redis_mini_client")

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"

# The service refuses a long-poll above 30 s (GET /tasks/{id}?wait=S, 0 < S <= 30).
MAX_POLL_SECONDS = 30.0
# A long-poll of S seconds may be read until S plus this: the time for its answer to arrive.
POLL_GRACE_SECONDS = 0.5
# Below this, a long-poll slice is not worth a request: the wait has timed out.
MIN_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class Call:
    """One HTTP exchange an operation needs.

    `long_poll` adds to the read timeout; `budget`, when set, is the seconds the call has left
    before its deadline, and caps every one of the request's timeouts.
    """

    method: str
    path: str
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    long_poll: float = 0.0
    budget: float | None = None

    def build(self, http: httpx.Client | httpx.AsyncClient, options: Options) -> httpx.Request:
        timeout = options.timeout
        read = timeout.read
        if self.long_poll and read is not None:
            read += self.long_poll
        limits = dict(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)
        if self.budget is not None:
            budget = max(self.budget, 0.0)
            limits = {name: budget if v is None else min(v, budget) for name, v in limits.items()}
        return http.build_request(
            self.method,
            options.base_url.join(self.path.lstrip("/")),
            json=self.json,
            headers={**options.headers, **self.headers},
            params=dict(self.params),
            timeout=httpx.Timeout(**limits),
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
    the answer's Retry-After: it is then random between Retry-After and a quarter more, so
    clients told the same Retry-After do not all come back in the same instant. An answer
    whose Retry-After is above retry_after_max is raised at once rather than waited out.
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
        backoff = ceiling * (0.5 + rng() / 2)
        if not retry_after:
            return backoff
        return max(backoff, retry_after * (1 + rng() / 4))


# openai-python's sizes: enough connections for a thousand calls in flight, few kept idle.
# An idle connection is dropped after 3 s, well before the api closes it (5 s): with httpx's
# default of 5 s, a request sent on a connection just as the server closed it failed (seen
# under load: "Server disconnected without sending a response", then a retry).
DEFAULT_LIMITS = httpx.Limits(
    max_connections=1000, max_keepalive_connections=100, keepalive_expiry=3.0
)


@dataclass(frozen=True)
class Options:
    """Where the service is and how each request is sent, whichever httpx client sends it."""

    base_url: httpx.URL
    headers: Mapping[str, str]
    timeout: httpx.Timeout

    @classmethod
    def of(
        cls,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        http_client: httpx.Client | httpx.AsyncClient | None = None,
    ) -> Options:
        """Check the options; base_url and api_key default to FRM_URL and FRM_API_KEY.

        A base URL that can never work (not http or https, malformed, no host) is a ValueError
        here rather than a request retried for half a minute. A caller's own http_client keeps
        its pool timeout; the client's own pool has none.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be more than 0 seconds, not {timeout}")
        text = base_url or os.environ.get("FRM_URL") or DEFAULT_URL
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL as error:
            raise ValueError(f"base_url {text!r} is not a valid URL: {error}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url {text!r} is not an http:// or https:// URL with a host")
        if not url.raw_path.endswith(b"/"):
            url = url.copy_with(raw_path=url.raw_path + b"/")
        if api_key is None:
            api_key = os.environ.get("FRM_API_KEY")
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # No pool timeout of the client's own: a call queues for a free connection, bounded
        # by its deadline, rather than failing as if the service were down.
        pool = None if http_client is None else http_client.timeout.pool
        return cls(url, headers, httpx.Timeout(timeout, pool=pool))


def _task_path(task_id: str) -> str:
    if not task_id:  # "/tasks/" is another route, which would answer a redirect
        raise ValueError("task_id must not be empty")
    return "/tasks/" + quote(task_id, safe="")


def check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be 0 or more seconds, or None, not {timeout}")


class _OutOfTimeError(Exception):
    """The deadline passed inside an exchange; the operation turns it into WaitTimeoutError."""


class Core:
    """The operations, as flows. `clock` and `rng` are the monotonic clock and jitter source.

    A deadline is a time on `clock`, or None for none. Every request of an operation with a
    deadline gets only the time left (Call.budget), and so does every sleep between retries.
    """

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
        deadline: float | None = None,
        schedule: Schedule | None = None,
    ) -> Flow[Task]:
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping, not {type(params).__name__}")
        body = {"prompt": prompt, "params": dict(params or {})}
        if schedule is not None:
            body |= schedule.to_json()
        # Every submit carries a key, so a retry of a submit whose answer was lost finds the
        # first task instead of creating a second.
        key = idempotency_key or uuid.uuid4().hex
        call = Call(
            "POST",
            "/tasks",
            json=body,
            headers={"Idempotency-Key": key},
        )
        response = yield from self._exchange(call, deadline)
        return task_of(response)

    def get(self, task_id: str) -> Flow[Task]:
        response = yield from self._exchange(Call("GET", _task_path(task_id)))
        return task_of(response)

    def wait(self, task_id: str, timeout: float | None) -> Flow[Task]:
        """Long-poll in slices of at most 30 s until the task is final or `timeout` passes."""
        check_timeout(timeout)
        deadline = None if timeout is None else self._clock() + timeout
        return (yield from self._wait(task_id, deadline, timeout))

    def _wait(self, task_id: str, deadline: float | None, timeout: float | None) -> Flow[Task]:
        task: Task | None = None
        try:
            while True:
                left = MAX_POLL_SECONDS if deadline is None else deadline - self._clock()
                if left < MIN_POLL_SECONDS:
                    if task is None:  # a zero timeout still reads the task once
                        task = yield from self.get(task_id)
                    if task.is_final:
                        return task
                    raise WaitTimeoutError(task_id, timeout or 0.0, task)
                poll = min(left, MAX_POLL_SECONDS)
                call = Call(
                    "GET",
                    _task_path(task_id),
                    params={"wait": f"{poll:.3f}"},
                    long_poll=poll,
                    budget=None if deadline is None else poll + POLL_GRACE_SECONDS,
                )
                response = yield from self._exchange(call, deadline, POLL_GRACE_SECONDS)
                task = task_of(response)
                if task.is_final:
                    return task
        except _OutOfTimeError as out:
            raise WaitTimeoutError(task_id, timeout or 0.0, task) from out.__cause__

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
        on_submit: Callable[[Task], None] | None = None,
        schedule: Schedule | None = None,
    ) -> Flow[Any]:
        """Submit, wait, and return the result, or raise TaskFailedError/TaskCancelledError.

        `timeout` bounds the whole call, the submit and its retries included. `on_submit` is
        called with the submitted task before the wait.
        """
        check_timeout(timeout)
        deadline = None if timeout is None else self._clock() + timeout
        task = yield from self.submit_within(
            prompt, params, idempotency_key, deadline, timeout, schedule
        )
        if on_submit is not None:
            on_submit(task)
        if not task.is_final:
            task = yield from self._wait(task.task_id, deadline, timeout)
        return outcome(task)

    def submit_within(
        self,
        prompt: str,
        params: Mapping[str, Any] | None,
        idempotency_key: str | None,
        deadline: float | None,
        timeout: float | None,
        schedule: Schedule | None = None,
    ) -> Flow[Task]:
        """The submit of a run: WaitTimeoutError when it cannot succeed before the deadline."""
        try:
            return (yield from self.submit(prompt, params, idempotency_key, deadline, schedule))
        except _OutOfTimeError as out:
            raise WaitTimeoutError(None, timeout or 0.0, None) from out.__cause__

    def _exchange(
        self, call: Call, deadline: float | None = None, grace: float = 0.0
    ) -> Flow[httpx.Response]:
        """Send `call`, retrying what is safe to retry; a 2xx answer or an exception.

        With a deadline, the call gets only the time left (plus `grace`), and a retry that
        cannot happen before the deadline raises _OutOfTimeError, caused by the last failure.
        """
        attempt = 0
        failure: Exception | None = None
        # The service's last answer: when the deadline cuts a later attempt short, that
        # answer, not the cut-off read, says why the call did not succeed.
        answered: APIError | None = None
        while True:
            left = None if deadline is None else deadline - self._clock()
            if left is not None and left + grace <= 0:
                raise _OutOfTimeError() from failure
            attempt += 1
            try:
                response = yield call if left is None else replace_budget(call, left + grace)
            except httpx.PoolTimeout as pool_timeout:
                # Every connection of this client's own pool was busy: the service was never
                # asked, so this is neither its fault nor worth a retry.
                if deadline is not None and self._clock() >= deadline:
                    raise _OutOfTimeError() from pool_timeout
                raise PoolTimeoutError(call.method, call.path) from pool_timeout
            except httpx.TransportError as transport_error:
                if deadline is not None and self._clock() >= deadline:
                    raise _OutOfTimeError() from (answered or transport_error)
                failure = transport_error
                retry_after = None
                retryable = not _cannot_improve(transport_error)
            else:
                assert response is not None
                if response.is_success:
                    return response
                failure = answered = error_from_response(response, attempts=attempt)
                retry_after = failure.retry_after
                retryable = failure.retryable and (retry_after or 0) <= self.retry.retry_after_max
            delay = self.retry.delay(attempt, retry_after, self._rng)
            late = deadline is not None and self._clock() + delay >= deadline
            if retryable and attempt < self.retry.attempts and late:
                raise _OutOfTimeError() from failure
            if not retryable or attempt >= self.retry.attempts:
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


def replace_budget(call: Call, budget: float) -> Call:
    return dataclasses.replace(
        call, budget=budget if call.budget is None else min(budget, call.budget)
    )


def _cannot_improve(error: httpx.TransportError) -> bool:
    """Whether retrying cannot help: a scheme httpx cannot speak, or a host name that DNS
    says does not exist (a temporary DNS failure is still retried)."""
    if isinstance(error, httpx.UnsupportedProtocol):
        return True
    cause: BaseException | None = error
    for _ in range(8):  # httpx wraps httpcore's error, which wraps the socket's
        if cause is None:
            break
        if isinstance(cause, socket.gaierror):
            return cause.errno in _NO_SUCH_HOST
        cause = cause.__cause__ or cause.__context__
    return False


_NO_SUCH_HOST = {
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
}


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
    if task.status is TaskStatus.EXPIRED:
        raise TaskExpiredError(task)
    return task.result
