"""Client and AsyncClient: the same operations over a blocking and an asyncio httpx client.

Both only carry out the flows of `_core`: they send its calls and sleep its sleeps. Every
behaviour (retries, long-poll slices, errors) is the core's, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self, cast

import httpx

from ._core import Core, Flow, RetryPolicy, Sleep, T, http_options
from .models import Task

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """A blocking client of the task service.

    base_url: where the api listens. api_key: sent as `Authorization: Bearer KEY` when the
    service has API_KEYS set. timeout: seconds for connecting, sending and reading one
    answer (a long-poll adds its own wait to the read). retry: see RetryPolicy.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._core = Core(retry or RetryPolicy())
        self._http = httpx.Client(**http_options(base_url, api_key, timeout))

    def submit(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Queue a task (or get a cached result). Without an idempotency_key, one is made."""
        return self._drive(self._core.submit(prompt, params, idempotency_key))

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
    ) -> Any:
        """Submit and wait: the result, or TaskFailedError, TaskCancelledError, WaitTimeoutError."""
        return self._drive(self._core.run(prompt, params, timeout, idempotency_key))

    def close(self) -> None:
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
                    answer = self._http.send(effect.build(self._http))
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
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._core = Core(retry or RetryPolicy())
        self._http = httpx.AsyncClient(**http_options(base_url, api_key, timeout))

    async def submit(
        self,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """See Client.submit."""
        return await self._drive(self._core.submit(prompt, params, idempotency_key))

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
    ) -> Any:
        """See Client.run."""
        return await self._drive(self._core.run(prompt, params, timeout, idempotency_key))

    async def aclose(self) -> None:
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
                    answer = await self._http.send(effect.build(self._http))
                except httpx.TransportError as error:
                    failure = error
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            flow.close()
