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

# Where `redis_url` points: "server" (one standalone server, the default) or "cluster" (the
# session's 6-node loopback cluster, 3 masters and 3 replicas, of the same TEST_REDIS_SERVER).
BACKENDS = ("server", "cluster")


def redis_backend_name() -> str:
    backend = os.environ.get("TEST_REDIS_BACKEND", "server")
    if backend not in BACKENDS:
        raise pytest.UsageError(
            f"TEST_REDIS_BACKEND must be one of {', '.join(BACKENDS)}, not {backend!r}"
        )
    return backend


def pytest_report_header() -> str:
    server = os.environ.get("TEST_REDIS_SERVER", "valkey")
    return f"redis server: {server}, backend: {redis_backend_name()}"


# Tests that share something machine-wide or costly run in one xdist worker (`--dist
# loadgroup`): the image tests build the same tags on one Docker engine, each worker that
# touches the session cluster would start six more servers of its own, and the first
# `ip netns add` of several processes at once can race to mount /run/netns.
DOCKER_TESTS = ("tests/images/", "tests/chart/test_images.py")


def _xdist_group(item: pytest.Item) -> str | None:
    path = item.nodeid.split("::", 1)[0]
    if path.startswith(DOCKER_TESTS):
        return "docker"
    if "redis_cluster" in getattr(item, "fixturenames", ()):
        return "cluster"
    if item.get_closest_marker("netns") is not None:
        return "netns"
    return None


# First: xdist's own hook turns the group marks into the node ids it schedules by.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests that share a machine-wide resource; on the cluster backend, skip the
    tests marked `single_server`, with the mark's reason."""
    for item in items:
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if redis_backend_name() != "cluster":
        return
    for item in items:
        mark = item.get_closest_marker("single_server")
        if mark is not None:
            reason = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "")
            item.add_marker(pytest.mark.skip(reason=f"single server: {reason}"))


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


@pytest.fixture(scope="session")
def redis_backend(request: pytest.FixtureRequest) -> RedisServer | RedisCluster:
    """What TEST_REDIS_BACKEND names: the session server, or the session cluster. Fixtures
    wider than one test use it directly, and empty it themselves."""
    if redis_backend_name() == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster
    server: RedisServer = request.getfixturevalue("redis_server")
    return server


@pytest.fixture
def redis_url(redis_backend: RedisServer | RedisCluster) -> str:
    """The backend's URL (on a cluster, one node's), emptied before the test."""
    redis_backend.flush()
    return redis_backend.url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Settings pointing at the test server, with short timers where tests wait on them."""
    return Settings(redis_url=redis_url, claim_idle=2.0, shutdown_grace=5.0, log_format="text")


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the backend; on the cluster one that follows the slots."""
    client: redis.asyncio.Redis
    if redis_backend_name() == "cluster":
        # The two clients share the command API the tests use; the cluster one routes by slot.
        client = redis.asyncio.RedisCluster.from_url(redis_url, decode_responses=True)  # type: ignore[assignment]
    else:
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
