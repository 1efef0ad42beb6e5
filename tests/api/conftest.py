from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest

from fastapi_redis_mini.api.app import create_app
from fastapi_redis_mini.core.handlers import SimulatedInference
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.redis.keys import Partitions
from fastapi_redis_mini.core.redis.queue import is_cluster
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker.runner import Worker

ClientFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@asynccontextmanager
async def _running_worker(settings: Settings) -> AsyncIterator[Worker]:
    queue = RedisTaskQueue(connect(settings), settings)
    worker = Worker(queue, SimulatedInference(settings.max_task_duration), settings)
    running = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(running, 15)
        await queue.close()


@pytest.fixture
def make_client(settings: Settings) -> ClientFactory:
    """An in-process client for the app, with or without a worker, under changed settings."""

    @asynccontextmanager
    async def factory(
        *, worker: bool = True, **overrides: object
    ) -> AsyncIterator[httpx.AsyncClient]:
        configured = settings.model_copy(update=overrides)
        app = create_app(configured)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            if worker:
                async with _running_worker(configured):
                    yield client
            else:
                yield client

    return factory


@pytest.fixture
async def client(make_client: ClientFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as client:
        yield client


@pytest.fixture
def partitions(settings: Settings) -> Partitions:
    """The key names the app uses on the test backend, for tests that look at Redis."""
    return Partitions.from_settings(settings, cluster=is_cluster(settings))
