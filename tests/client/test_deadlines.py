"""A call given timeout=T returns within T, whatever the service does: it answers 503, is
down, or accepts connections and never answers. Each test uses the default RetryPolicy, as a
new user would, since the defaults are what once let a 5 s call take 106 s.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from fastapi_redis_mini_client import RedisUnavailableError, RetryPolicy, WaitTimeoutError
from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.processes import Process, start_api

from .conftest import BlockingClient, Connect

pytestmark = pytest.mark.slow

DEFAULTS = RetryPolicy()
# What a deadline may overrun by: a long-poll's answer may take POLL_GRACE_SECONDS (0.5 s) to
# arrive, and a loaded machine schedules the test late.
SLACK = 1.5


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A listener that completes every connection (the kernel does) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def answers_once_then_hangs() -> Iterator[str]:
    """A service that answers its first request 503 redis_unavailable and never answers again.

    The deadline then falls inside the second attempt's read, as it does when a loaded api is
    slow to answer its 503: the call must still say the service's answer was why.
    """
    body = json.dumps({"error": {"code": "redis_unavailable", "message": "redis is down"}})
    answer = (
        f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"retry-after: 1\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve(listener: socket.socket) -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            if held or stop.is_set():  # every later request: read, then never answer
                held.append(connection)
                continue
            held.append(connection)
            connection.settimeout(5)
            connection.recv(65536)
            connection.sendall(answer)
            connection.close()

    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            stop.set()
            thread.join(timeout=5)
            for connection in held:
                connection.close()


def test_a_deadline_inside_a_retry_keeps_the_services_answer_as_the_cause(
    connect: Connect, answers_once_then_hangs: str
) -> None:
    client = connect(answers_once_then_hangs, None, retry=DEFAULTS)
    error, took = timed_out(client.run, "slow 503", timeout=3)
    assert took < 3 + SLACK
    assert error.task_id is None
    assert isinstance(error.__cause__, RedisUnavailableError), repr(error.__cause__)


@pytest.fixture(scope="module")
def no_redis_api() -> Iterator[Process]:
    """An api whose Redis is gone: every task route answers 503 redis_unavailable."""
    api = start_api(f"redis://127.0.0.1:{free_port()}/0", wait=False)
    try:
        api.wait_until_answers("/healthz", timeout=40)
        yield api
    finally:
        api.close()


def timed_out(
    call: Callable[..., object], *args: object, timeout: float
) -> tuple[WaitTimeoutError, float]:
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError) as raised:
        call(*args, timeout=timeout)
    return raised.value, time.monotonic() - began


def test_run_with_redis_gone_times_out_at_its_deadline(
    connect: Connect, no_redis_api: Process
) -> None:
    client = connect(no_redis_api.base_url, None, retry=DEFAULTS)
    error, took = timed_out(client.run, f"no redis {uuid.uuid4().hex}", {"duration": 1}, timeout=5)
    assert took < 5 + SLACK
    assert error.task_id is None  # never submitted
    assert isinstance(error.__cause__, RedisUnavailableError)  # and why
    assert str(error) == "task not submitted within 5 s"


def test_run_with_the_api_down_times_out_at_its_deadline(connect: Connect) -> None:
    client = connect(f"http://127.0.0.1:{free_port()}", retry=DEFAULTS)
    error, took = timed_out(client.run, "api down", timeout=2)
    assert took < 2 + SLACK
    assert error.task_id is None


@pytest.mark.parametrize("operation", ["run", "wait"])
def test_a_service_that_never_answers_times_out_at_the_deadline(
    connect: Connect, silent_url: str, operation: str
) -> None:
    client = connect(silent_url, retry=DEFAULTS)  # its own timeout: 10 s a request
    call = client.run if operation == "run" else client.wait
    error, took = timed_out(call, "hang", timeout=3)
    assert took < 3 + SLACK
    assert error.task is None


def test_run_times_out_naming_the_timeout_it_was_given(client: BlockingClient) -> None:
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError) as raised:
        client.run(f"slow {uuid.uuid4().hex}", {"duration": 5}, timeout=1)
    assert time.monotonic() - began < 1 + SLACK
    assert str(raised.value).endswith("not finished after 1 s")
    assert raised.value.task is not None
    assert not raised.value.task.is_final
