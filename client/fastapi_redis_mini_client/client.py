"""Client and AsyncClient: the same operations over a blocking and an asyncio httpx client.

Both only carry out the flows of `_core`: they send its calls and sleep its sleeps. Every
behaviour (retries, long-poll slices, errors) is the core's, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, cast

import httpx

from ._core import (
    DEFAULT_LIMITS,
    DEFAULT_URL,
    Core,
    Flow,
    Options,
    RetryPolicy,
    Sleep,
    T,
    check_timeout,
    outcome,
)
from .errors import ClientClosedError, WaitTimeoutError
from .events import Follower, TaskEvent
from .models import Schedule, Task

__all__ = ["DEFAULT_URL", "AsyncClient", "Client"]


class Client:
    """A blocking client of the task service.

    base_url: where the api listens (default: FRM_URL, else http://127.0.0.1:8000).
    api_key: sent as `Authorization: Bearer KEY` when the service has API_KEYS set (default:
    FRM_API_KEY; "" sends none). timeout: seconds for connecting, sending and reading one
    answer (a long-poll adds its own wait to the read). retry: see RetryPolicy.
    limits: the connection pool (default 1,000 connections, 100 kept alive).
    http_client: an httpx.Client of your own to send with (proxies, certificates, transports);
    the client then leaves limits and closing to you.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        limits: httpx.Limits | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        if http_client is not None and limits is not None:
            raise ValueError("give limits= or http_client=, not both: limits are the client's")
        self._core = Core(retry or RetryPolicy())
        self._options = Options.of(base_url, api_key, timeout, http_client)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(limits=limits or DEFAULT_LIMITS)
        self._closed = False

    def submit(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        *,
        schedule: Schedule | None = None,
    ) -> Task:
        """Queue a task (or get a cached result). Without an idempotency_key, one is made.

        `schedule` sets its priority, a delayed start and a deadline (see Schedule). An
        identical request in flight answers with its task, `coalesced` True.
        """
        return self._drive(self._core.submit(prompt, params, idempotency_key, None, schedule))

    def get(self, task_id: str) -> Task:
        """The task's current state."""
        return self._drive(self._core.get(task_id))

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """The task once final; WaitTimeoutError after `timeout` s (None waits without end)."""
        return self._drive(self._core.wait(task_id, timeout))

    def cancel(self, task_id: str) -> Task:
        """Cancel a task; ConflictError when it is already final."""
        return self._drive(self._core.cancel(task_id))

    def run(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        *,
        on_submit: Callable[[Task], None] | None = None,
        on_progress: Callable[[TaskEvent], None] | None = None,
        schedule: Schedule | None = None,
    ) -> Any:
        """Submit and wait: the result, or TaskFailedError, TaskCancelledError,
        TaskExpiredError, WaitTimeoutError.

        `timeout` bounds the whole call, the submit included. `on_submit(task)` is called once
        the task is submitted, e.g. to keep its id should the wait be interrupted. With
        `on_progress(event)`, the wait follows the task's events and calls it for each
        progress event (`event.fraction`, `event.data["message"]`).
        """
        if on_progress is None:
            return self._drive(
                self._core.run(prompt, params, timeout, idempotency_key, on_submit, schedule)
            )
        check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        task = self._drive(
            self._core.submit_within(prompt, params, idempotency_key, deadline, timeout, schedule)
        )
        if on_submit is not None:
            on_submit(task)
        if not task.is_final:
            left = None if deadline is None else deadline - time.monotonic()
            for event in self.events(task.task_id, timeout=left):
                if event.kind == "progress":
                    on_progress(event)
                final = event.task
                if final is not None:
                    task = final
        return outcome(task)

    def events(
        self, task_id: str, last_event_id: str | None = None, *, timeout: float | None = None
    ) -> Iterator[TaskEvent]:
        """The task's events as they happen, until its final one (done, failed, cancelled).

        A dropped connection is resumed after the last event received, so every event comes
        once; `last_event_id` resumes an earlier follow. WaitTimeoutError after `timeout` s.
        """
        if self._closed or self._http.is_closed:
            raise ClientClosedError("this client is closed")
        follower = Follower(task_id, self._core.retry, last_event_id, timeout)
        while not follower.ended:
            try:
                answer = self._http.send(follower.request(self._http, self._options), stream=True)
                try:
                    if answer.status_code >= 400:
                        answer.read()
                        delay = follower.refused(answer)
                    elif not follower.opened(answer):
                        return
                    else:
                        for line in answer.iter_lines():
                            event = follower.line(line)
                            if event is not None:
                                yield event
                        if follower.ended:
                            return
                        delay = follower.dropped(None)
                finally:
                    answer.close()
            except httpx.TransportError as error:
                delay = follower.dropped(error)
            time.sleep(delay)

    def wait_all(self, task_ids: Iterable[str], timeout: float | None = None) -> list[Task]:
        """Every task once final, in the order given; one `timeout` for them all.

        The tasks are waited for one after the other: the total is the slowest task's time,
        since a task already final answers at once. FAILED and CANCELLED tasks are returned,
        not raised; WaitTimeoutError names the first task not final in time.
        """
        ids = list(task_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        tasks: list[Task] = []
        for task_id in ids:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:  # past the deadline: no read
                raise WaitTimeoutError(task_id, timeout or 0.0, None)
            try:
                tasks.append(self.wait(task_id, left))
            except WaitTimeoutError as error:
                raise WaitTimeoutError(task_id, timeout or 0.0, error.task) from error.__cause__
        return tasks

    def close(self) -> None:
        """Close the connections; a client given its http_client leaves that open."""
        self._closed = True
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _drive(self, flow: Flow[T]) -> T:
        if self._closed or self._http.is_closed:
            flow.close()
            raise ClientClosedError("this client is closed")
        answer: httpx.Response | None = None
        failure: httpx.TransportError | None = None
        try:
            while True:
                effect = flow.throw(failure) if failure else flow.send(answer)
                answer, failure = None, None
                if isinstance(effect, Sleep):
                    time.sleep(effect.seconds)
                    continue
                try:
                    answer = self._http.send(effect.build(self._http, self._options))
                except httpx.TransportError as error:
                    failure = error
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            flow.close()


class AsyncClient:
    """The asyncio twin of Client: the same options, operations and errors, awaited.

    wait and run take a `timeout` like Client's rather than leaving it to asyncio.timeout:
    the service is asked to wait at most that long, and the last state read comes back in the
    WaitTimeoutError instead of a request cut off mid-poll.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        limits: httpx.Limits | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if http_client is not None and limits is not None:
            raise ValueError("give limits= or http_client=, not both: limits are the client's")
        self._core = Core(retry or RetryPolicy())
        self._options = Options.of(base_url, api_key, timeout, http_client)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(limits=limits or DEFAULT_LIMITS)
        self._closed = False

    async def submit(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        *,
        schedule: Schedule | None = None,
    ) -> Task:
        """See Client.submit."""
        flow = self._core.submit(prompt, params, idempotency_key, None, schedule)
        return await self._drive(flow)

    async def get(self, task_id: str) -> Task:
        """See Client.get."""
        return await self._drive(self._core.get(task_id))

    async def wait(self, task_id: str, timeout: float | None = None) -> Task:  # noqa: ASYNC109
        """See Client.wait."""
        return await self._drive(self._core.wait(task_id, timeout))

    async def cancel(self, task_id: str) -> Task:
        """See Client.cancel."""
        return await self._drive(self._core.cancel(task_id))

    async def run(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (see the class docstring)
        idempotency_key: str | None = None,
        *,
        on_submit: Callable[[Task], None] | None = None,
        on_progress: Callable[[TaskEvent], None] | None = None,
        schedule: Schedule | None = None,
    ) -> Any:
        """See Client.run."""
        if on_progress is None:
            flow = self._core.run(prompt, params, timeout, idempotency_key, on_submit, schedule)
            return await self._drive(flow)
        check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        task = await self._drive(
            self._core.submit_within(prompt, params, idempotency_key, deadline, timeout, schedule)
        )
        if on_submit is not None:
            on_submit(task)
        if not task.is_final:
            left = None if deadline is None else deadline - time.monotonic()
            async for event in self.events(task.task_id, timeout=left):
                if event.kind == "progress":
                    on_progress(event)
                final = event.task
                if final is not None:
                    task = final
        return outcome(task)

    async def events(
        self,
        task_id: str,
        last_event_id: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (see the class docstring)
    ) -> AsyncIterator[TaskEvent]:
        """See Client.events."""
        if self._closed or self._http.is_closed:
            raise ClientClosedError("this client is closed")
        follower = Follower(task_id, self._core.retry, last_event_id, timeout)
        while not follower.ended:
            try:
                request = follower.request(self._http, self._options)
                answer = await self._http.send(request, stream=True)
                try:
                    if answer.status_code >= 400:
                        await answer.aread()
                        delay = follower.refused(answer)
                    elif not follower.opened(answer):
                        return
                    else:
                        async for line in answer.aiter_lines():
                            event = follower.line(line)
                            if event is not None:
                                yield event
                        if follower.ended:
                            return
                        delay = follower.dropped(None)
                finally:
                    await answer.aclose()
            except httpx.TransportError as error:
                delay = follower.dropped(error)
            await asyncio.sleep(delay)

    async def wait_all(
        self,
        task_ids: Iterable[str],
        timeout: float | None = None,  # noqa: ASYNC109 (see the class docstring)
        *,
        concurrency: int = 20,
    ) -> list[Task]:
        """Every task once final, in the order given; one `timeout` for them all.

        At most `concurrency` long-polls are open at a time, so a thousand ids need neither a
        thousand connections nor a semaphore of your own. FAILED and CANCELLED tasks are
        returned, not raised; the first error raised (WaitTimeoutError naming a task not final
        in time, TaskNotFoundError, ...) cancels the other waits.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        ids = list(task_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        gate = asyncio.Semaphore(concurrency)

        async def one(task_id: str) -> Task:
            async with gate:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:  # queued past the deadline: no read
                    raise WaitTimeoutError(task_id, timeout or 0.0, None)
                try:
                    return await self.wait(task_id, left)
                except WaitTimeoutError as error:
                    raise WaitTimeoutError(task_id, timeout or 0.0, error.task) from error

        waits = [asyncio.ensure_future(one(task_id)) for task_id in ids]
        try:
            return list(await asyncio.gather(*waits))
        finally:
            for pending in waits:  # after a failure, the waits still running
                pending.cancel()

    async def aclose(self) -> None:
        """Close the connections; a client given its http_client leaves that open."""
        self._closed = True
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _drive(self, flow: Flow[T]) -> T:
        if self._closed or self._http.is_closed:
            flow.close()
            raise ClientClosedError("this client is closed")
        answer: httpx.Response | None = None
        failure: httpx.TransportError | None = None
        try:
            while True:
                effect = flow.throw(failure) if failure else flow.send(answer)
                answer, failure = None, None
                if isinstance(effect, Sleep):
                    await asyncio.sleep(effect.seconds)
                    continue
                try:
                    answer = await self._http.send(effect.build(self._http, self._options))
                except httpx.TransportError as error:
                    failure = error
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            flow.close()
