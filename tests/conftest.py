"""Fixtures shared by the whole suite: a real Redis-compatible server, never a mock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio

from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.redis_cluster import RedisCluster
from fastapi_redis_mini_harness.redis_server import RedisServer


def pytest_report_header() -> str:
    return f"redis server: {os.environ.get('TEST_REDIS_SERVER', 'valkey')}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for the session; tests that restart or kill a server start their own."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 6-node Redis Cluster (3 masters, 3 replicas) for the session, started on first use."""
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    """One node's URL of the session cluster, every master emptied before the test."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied before the test."""
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Settings pointing at the test server, with short timers where tests wait on them."""
    return Settings(redis_url=redis_url, claim_idle=2.0, shutdown_grace=5.0, log_format="text")


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[RedisTaskQueue]:
    """The Redis queue on the test server, with its consumer group made."""
    queue = RedisTaskQueue(connect(settings), settings)
    await queue.ensure_group()
    yield queue
    await queue.close()
