"""The client against the real service: a Redis server, the api and a worker as processes.

Every test that takes `connect` runs twice, once with Client and once with AsyncClient (driven
from the test's thread through an anyio portal), so the two are held to one specification.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from fastapi_redis_mini_client import (
    AsyncClient,
    Client,
    RetryPolicy,
    Schedule,
    Task,
    TaskEvent,
)
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_server import RedisServer

API_KEY, OTHER_API_KEY = "client-tests-key", "client-tests-other-key"
SERVICE_ENV = {
    "API_KEYS": f"{API_KEY},{OTHER_API_KEY}",
    # Long enough for a task that outlasts one 30 s long-poll.
    "MAX_TASK_DURATION": "35",
    "TASK_TIMEOUT": "60",
    # The worker hears of a cancel at its keep-alive, every CLAIM_IDLE/3 s: 1 s, well within
    # the 10 s tasks the cancel tests stop.
    "CLAIM_IDLE": "3",
}
# Retries fast enough for a test; the outage tests pass their own.
FAST_RETRY = RetryPolicy(attempts=4, backoff=0.1, backoff_max=0.5)

R = TypeVar("R")


class BlockingClient(Protocol):
    """Client's calls; what every parametrised test uses."""

    def submit(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        *,
        schedule: Schedule | None = None,
    ) -> Task: ...

    def get(self, task_id: str) -> Task: ...

    def wait(self, task_id: str, timeout: float | None = None) -> Task: ...

    def cancel(self, task_id: str) -> Task: ...

    def run(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        *,
        on_progress: Callable[[TaskEvent], None] | None = None,
        schedule: Schedule | None = None,
    ) -> Any: ...

    def events(
        self, task_id: str, last_event_id: str | None = None, *, timeout: float | None = None
    ) -> Iterable[TaskEvent]: ...


class PortalClient:
    """An AsyncClient whose coroutines run on the portal's event loop, called like Client."""

    def __init__(self, portal: BlockingPortal, client: AsyncClient) -> None:
        self._portal = portal
        self._client = client

    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return self._portal.call(functools.partial(function, *args))

    def submit(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        *,
        schedule: Schedule | None = None,
    ) -> Task:
        submit = functools.partial(self._client.submit, schedule=schedule)
        task: Task = self._call(submit, prompt, params, idempotency_key)
        return task

    def get(self, task_id: str) -> Task:
        task: Task = self._call(self._client.get, task_id)
        return task

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        task: Task = self._call(self._client.wait, task_id, timeout)
        return task

    def cancel(self, task_id: str) -> Task:
        task: Task = self._call(self._client.cancel, task_id)
        return task

    def run(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        *,
        on_progress: Callable[[TaskEvent], None] | None = None,
        schedule: Schedule | None = None,
    ) -> Any:
        run = functools.partial(self._client.run, on_progress=on_progress, schedule=schedule)
        return self._call(run, prompt, params, timeout, idempotency_key)

    def events(
        self, task_id: str, last_event_id: str | None = None, *, timeout: float | None = None
    ) -> Iterable[TaskEvent]:
        async def collect() -> list[TaskEvent]:
            follow = self._client.events(task_id, last_event_id, timeout=timeout)
            return [event async for event in follow]

        events: list[TaskEvent] = self._portal.call(collect)
        return events


@dataclass
class Stack:
    redis: RedisServer
    api: Process
    worker: Process


@pytest.fixture(scope="package")
def stack() -> Iterator[Stack]:
    """One Redis, api and worker for the package; tests keep apart by unique prompts."""
    server = RedisServer()
    server.start()
    with ExitStack() as started:
        started.callback(server.close)
        api = start_api(server.url, SERVICE_ENV, wait=False)
        started.callback(api.close)
        worker = start_worker(server.url, SERVICE_ENV, wait=False)
        started.callback(worker.close)
        api.wait_until_answers("/readyz", timeout=40)
        worker.wait_until_answers("/healthz", timeout=40)
        yield Stack(server, api, worker)


class Connect(Protocol):
    kind: str

    def __call__(
        self,
        url: str,
        api_key: str | None = API_KEY,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = FAST_RETRY,
    ) -> BlockingClient: ...


class _Connect:
    def __init__(self, kind: str, opened: ExitStack) -> None:
        self.kind = kind
        self._opened = opened
        self._portal: BlockingPortal | None = None

    def __call__(
        self,
        url: str,
        api_key: str | None = API_KEY,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = FAST_RETRY,
    ) -> BlockingClient:
        if self.kind == "sync":
            client = Client(url, api_key, timeout=timeout, retry=retry)
            self._opened.callback(client.close)
            return client
        if self._portal is None:
            self._portal = self._opened.enter_context(start_blocking_portal())
        portal = self._portal
        async_client = AsyncClient(url, api_key, timeout=timeout, retry=retry)
        self._opened.callback(portal.call, async_client.aclose)
        return PortalClient(portal, async_client)


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Opens clients of the parametrised kind; all are closed after the test."""
    with ExitStack() as opened:
        yield _Connect(request.param, opened)


@pytest.fixture
def client(connect: Connect, stack: Stack) -> BlockingClient:
    """A client of the parametrised kind on the package's api, with its API key."""
    return connect(stack.api.base_url)
