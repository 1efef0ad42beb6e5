"""The console in process: absent unless enabled, and a 503 page naming Redis's state when
Redis refuses an action, never a 500 or a traceback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from fastapi_redis_mini.api.app import create_app
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support import faults

ADMIN_KEY = "in-process-admin-key-0123"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport,
            base_url="http://test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as client,
    ):
        yield client


@pytest.fixture
async def console(server: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        redis_url=server.url, log_format="text", console_enabled=True, admin_api_key=ADMIN_KEY
    )
    async for client in client_for(settings):
        yield client


async def test_without_console_enabled_there_is_no_console(server: RedisServer) -> None:
    async for client in client_for(Settings(redis_url=server.url, log_format="text")):
        for path in ("/console", "/console/login", "/console/static/console.js"):
            assert (await client.get(path)).status_code == 404, path


async def test_the_pages_assets_are_served_by_the_api(console: httpx.AsyncClient) -> None:
    for name, kind in (("console.js", "javascript"), ("console.css", "css")):
        answer = await console.get(f"/console/static/{name}")
        assert answer.status_code == 200
        assert kind in answer.headers["content-type"]
    page = await console.get("/console")
    assert "http://" not in page.text.replace("http://www.w3.org", "")
    assert "https://" not in page.text


async def test_an_action_redis_refuses_is_a_503_page_naming_the_state(
    console: httpx.AsyncClient, server: RedisServer
) -> None:
    task_id = "f" * 32
    client = server.client()
    try:  # a task that failed, as finish.lua leaves one
        client.hset(f"task:{task_id}", mapping={"status": "FAILED", "error": "boom"})
    finally:
        client.close()
    with faults.read_only(server):
        answer = await console.post(f"/console/tasks/{task_id}/retry", data={"csrf_token": ""})
    assert answer.status_code == 503
    assert "redis_read_only" in answer.text.replace(" ", "_")
    assert "Traceback" not in answer.text
