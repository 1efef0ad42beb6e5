"""The preStop hook's marker makes every answer close its connection; nothing else does."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from fastapi_redis_mini.api._middleware import EdgeMiddleware
from fastapi_redis_mini.api.drain import Drain, marker_path


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await PlainTextResponse("hello")(scope, receive, send)


async def test_answers_close_their_connection_once_the_marker_exists(tmp_path: Path) -> None:
    marker = tmp_path / "leaving"
    app = EdgeMiddleware(hello, max_body_bytes=1024, drain=Drain(marker))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        before = await client.get("/")
        marker.touch()
        await asyncio.sleep(0.3)  # the middleware looks at the marker every quarter second
        after = await client.get("/")
    assert before.text == after.text == "hello"
    assert "connection" not in before.headers
    assert after.headers["connection"] == "close"


@pytest.mark.slow
def test_the_hook_leaves_the_marker_where_the_api_looks(tmp_path: Path) -> None:
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.api.drain", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fastapi_redis_mini.api.drain import marker_path; print(marker_path())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert Path(probe.stdout.strip()).exists()
    assert Path(probe.stdout.strip()).parent == tmp_path
    assert marker_path().name == Path(probe.stdout.strip()).name


@pytest.mark.slow
def test_the_hook_refuses_a_pause_that_is_not_a_number_of_seconds() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.api.drain", "five"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "SECONDS" in result.stderr
