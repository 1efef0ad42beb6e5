"""While Redis refuses writes the api answers 503 naming why, never a 500; it stays ready, and
/healthz?detail=true names the state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager

import httpx
import pytest

from fastapi_redis_mini.api.app import create_app
from fastapi_redis_mini.api.errors import UNAVAILABLE
from fastapi_redis_mini.core.queue import QueueState
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support import faults

Fault = Callable[[RedisServer], AbstractContextManager[None]]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
async def client(server: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(redis_url=server.url, log_format="text"))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        yield client


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (faults.out_of_memory, "redis_out_of_memory"),
        (faults.read_only, "redis_read_only"),
        (faults.cannot_persist, "redis_cannot_persist"),
    ],
    ids=["oom", "readonly", "misconf"],
)
async def test_a_refused_write_is_a_503_naming_the_state(
    client: httpx.AsyncClient, server: RedisServer, fault: Fault, code: str
) -> None:
    with fault(server):
        submitted = await client.post("/tasks", json={"prompt": "refused"})
        ready = await client.get("/readyz")
        alive = await client.get("/healthz", params={"detail": "true"})
    assert submitted.status_code == 503
    assert submitted.json()["error"]["code"] == code
    assert int(submitted.headers["retry-after"]) > 0
    # The api answers the 503 itself, so it stays in the Service: readiness is the process's.
    assert ready.status_code == 200
    assert alive.status_code == 200
    assert alive.json() == {"status": "ok", "redis": code}
    assert (await client.get("/healthz", params={"detail": "true"})).json() == {
        "status": "ok",
        "redis": "ok",
    }
    assert (await client.post("/tasks", json={"prompt": "accepted"})).status_code == 202


async def test_an_unreachable_redis_is_a_503_redis_unavailable(
    client: httpx.AsyncClient, server: RedisServer
) -> None:
    server.stop(kill=True)
    try:
        submitted = await client.post("/tasks", json={"prompt": "nobody home"})
        ready = await client.get("/readyz")
        alive = await client.get("/healthz", params={"detail": "true"})
    finally:
        server.start()
    assert submitted.status_code == 503
    assert submitted.json()["error"]["code"] == "redis_unavailable"
    assert ready.status_code == 200
    assert alive.json() == {"status": "ok", "redis": "redis_unavailable"}


def test_every_queue_state_has_its_own_code_and_a_retry_after() -> None:
    # A state missing here would turn its 503 into a KeyError, and so into a 500.
    assert set(UNAVAILABLE) == set(QueueState)
    codes = [code for code, _ in UNAVAILABLE.values()]
    assert len(set(codes)) == len(codes)
    assert all(code.startswith("redis_") for code in codes)
    assert all(retry_after > 0 for _, retry_after in UNAVAILABLE.values())
