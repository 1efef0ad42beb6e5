"""Many calls at once on one AsyncClient: none queues into a failure, and wait_all bounds
the long-polls it holds open."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from fastapi_redis_mini_client import (
    AsyncClient,
    PoolTimeoutError,
    TaskStatus,
    WaitTimeoutError,
)

from .conftest import API_KEY, Stack

pytestmark = pytest.mark.slow

MANY = 500
SLACK = 1.5


class CountingListener:
    """Accepts every connection, counts it, and never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(connection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for connection in self.accepted:
            connection.close()
        self._listener.close()


@pytest.fixture
def listener() -> Iterator[CountingListener]:
    opened = CountingListener()
    try:
        yield opened
    finally:
        opened.close()


def test_500_concurrent_submits_and_runs_succeed_without_a_retry(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_redis_mini_client")

    async def scenario() -> None:
        async with AsyncClient(stack.api.base_url, API_KEY) as client:
            batch = uuid.uuid4().hex
            submitted = await asyncio.gather(
                *(client.submit(f"many {batch} {n}") for n in range(MANY))
            )
            finished = await client.wait_all([task.task_id for task in submitted], timeout=120)
            assert [task.task_id for task in finished] == [task.task_id for task in submitted]
            assert {task.status for task in finished} == {TaskStatus.DONE}
            results = await asyncio.gather(
                *(client.run(f"many runs {batch} {n}", timeout=120) for n in range(MANY))
            )
            assert all(result["output"] for result in results)

    asyncio.run(scenario())
    assert not [record for record in caplog.records if "retry" in record.getMessage()]


def test_wait_all_holds_at_most_its_concurrency_of_long_polls(
    listener: CountingListener,
) -> None:
    async def scenario() -> float:
        async with AsyncClient(listener.url, API_KEY) as client:
            began = time.monotonic()
            with pytest.raises(WaitTimeoutError):
                await client.wait_all([f"{n:032x}" for n in range(30)], timeout=1, concurrency=3)
            return time.monotonic() - began

    took = asyncio.run(scenario())
    assert took < 1 + SLACK
    assert 1 <= len(listener.accepted) <= 3


def test_a_full_connection_pool_is_a_pool_timeout_not_an_unreachable_service(
    listener: CountingListener,
) -> None:
    async def scenario() -> None:
        own = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1), timeout=httpx.Timeout(5.0, pool=0.2)
        )
        async with own, AsyncClient(listener.url, API_KEY, http_client=own) as client:
            holding = asyncio.ensure_future(client.get("a" * 32))  # takes the one connection
            try:
                await asyncio.sleep(0.3)
                began = time.monotonic()
                with pytest.raises(PoolTimeoutError) as raised:
                    await client.get("b" * 32)
                assert time.monotonic() - began < 0.2 + SLACK  # not retried
                assert isinstance(raised.value.__cause__, httpx.PoolTimeout)
            finally:
                holding.cancel()

    asyncio.run(scenario())
    assert len(listener.accepted) == 1
