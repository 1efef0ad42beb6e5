"""A submit retried through faults of the real service creates exactly one task."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from fastapi_redis_mini_client import RetryPolicy, TaskStatus
from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._faults import AnswerDroppingProxy
from .conftest import Connect

pytestmark = pytest.mark.slow

# Enough to ride out an api that takes many seconds to start on a loaded machine.
PATIENT = RetryPolicy(attempts=40, backoff=0.2, backoff_max=1.0)


@pytest.fixture
def own_stack() -> Iterator[tuple[RedisServer, ExitStack]]:
    """A Redis (with AOF, so a restart keeps its data) that this test may stop at will."""
    server = RedisServer(appendonly=True)
    server.start()
    with ExitStack() as started:
        started.callback(server.close)
        yield server, started


def start(started: ExitStack, launch: Callable[[], Process]) -> Process:
    service = launch()
    started.callback(service.close)
    return service


def tasks_in(server: RedisServer) -> list[str]:
    """The prompt of every task the server holds."""
    redis = server.client()
    try:
        return [
            json.loads(redis.hget(key, "request") or "{}")["prompt"]
            for key in redis.scan_iter(match="task:*", _type="hash")
        ]
    finally:
        redis.close()


def retries_logged(caplog: pytest.LogCaptureFixture, cause: str) -> int:
    return sum(
        "retry" in record.getMessage() and cause in record.getMessage() for record in caplog.records
    )


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    poll(condition, timeout, 0.05)


def test_a_submit_retried_through_a_redis_outage_creates_one_task(
    connect: Connect,
    own_stack: tuple[RedisServer, ExitStack],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_redis_mini_client")
    server, started = own_stack
    api = start(started, lambda: start_api(server.url))
    start(started, lambda: start_worker(server.url))
    client = connect(api.base_url, None, retry=PATIENT)
    prompt = f"through an outage {uuid.uuid4().hex}"

    server.stop(kill=True)
    with ThreadPoolExecutor(1) as pool:
        submitting = pool.submit(client.submit, prompt, {"duration": 0.2})
        wait_for(lambda: retries_logged(caplog, "redis_unavailable") >= 1, 20)
        server.start()
        task = submitting.result(timeout=60)

    assert retries_logged(caplog, "redis_unavailable") >= 1
    done = client.wait(task.task_id, timeout=30)
    assert done.status is TaskStatus.DONE
    assert done.attempts == 1
    assert tasks_in(server) == [prompt]


def test_a_submit_retried_through_an_api_restart_creates_one_task(
    connect: Connect,
    own_stack: tuple[RedisServer, ExitStack],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_redis_mini_client")
    server, started = own_stack
    port = free_port()
    api = start(started, lambda: start_api(server.url, port=port))
    start(started, lambda: start_worker(server.url))
    client = connect(api.base_url, None, retry=PATIENT)
    prompt = f"through a restart {uuid.uuid4().hex}"

    api.kill()  # a crash: nothing listens on the port until the new api binds it
    with ThreadPoolExecutor(1) as pool:
        submitting = pool.submit(client.submit, prompt, {"duration": 0.2})
        wait_for(lambda: retries_logged(caplog, "ConnectError") >= 1, 20)
        start(started, lambda: start_api(server.url, port=port, wait=False))
        task = submitting.result(timeout=90)

    assert retries_logged(caplog, "ConnectError") >= 1
    done = client.wait(task.task_id, timeout=30)
    assert done.status is TaskStatus.DONE
    assert done.attempts == 1
    assert tasks_in(server) == [prompt]


def test_a_submit_whose_answer_was_lost_is_retried_into_the_same_task(
    connect: Connect,
    own_stack: tuple[RedisServer, ExitStack],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The hard case: the api created the task, then the connection died before the answer
    # reached the client. Only the Idempotency-Key the client made tells the retry apart.
    caplog.set_level(logging.INFO, logger="fastapi_redis_mini_client")
    server, started = own_stack
    api = start(started, lambda: start_api(server.url))
    start(started, lambda: start_worker(server.url))
    api_port = int(api.base_url.rsplit(":", 1)[1])
    prompt = f"answer lost {uuid.uuid4().hex}"

    with AnswerDroppingProxy(api_port, drop=1) as proxy:
        client = connect(proxy.url, None, retry=PATIENT)
        task = client.submit(prompt, {"duration": 0.2})
        assert proxy.dropped == 1

    assert retries_logged(caplog, "RemoteProtocolError") == 1
    assert tasks_in(server) == [prompt]
    direct = connect(api.base_url, None)
    done = direct.wait(task.task_id, timeout=30)
    assert done.status is TaskStatus.DONE
    assert done.attempts == 1


def test_a_cancel_whose_answer_was_lost_returns_the_cancelled_task(
    connect: Connect,
    own_stack: tuple[RedisServer, ExitStack],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No worker: the task stays PENDING, so the first DELETE cancels it outright and the
    # retry meets a final task (409). That conflict is this call's own doing.
    caplog.set_level(logging.INFO, logger="fastapi_redis_mini_client")
    server, started = own_stack
    api = start(started, lambda: start_api(server.url))
    api_port = int(api.base_url.rsplit(":", 1)[1])
    task_id = connect(api.base_url, None).submit(f"cancel once {uuid.uuid4().hex}").task_id

    with AnswerDroppingProxy(api_port, drop=1) as proxy:
        cancelled = connect(proxy.url, None, retry=PATIENT).cancel(task_id)
        assert proxy.dropped == 1

    assert retries_logged(caplog, "RemoteProtocolError") == 1
    assert cancelled.task_id == task_id
    assert cancelled.status is TaskStatus.CANCELLED


def test_wait_rides_out_an_api_restart(
    connect: Connect,
    own_stack: tuple[RedisServer, ExitStack],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_redis_mini_client")
    server, started = own_stack
    port = free_port()
    api = start(started, lambda: start_api(server.url, port=port))
    start(started, lambda: start_worker(server.url))
    client = connect(api.base_url, None, retry=PATIENT)
    task_id = client.submit(f"wait across a restart {uuid.uuid4().hex}", {"duration": 3}).task_id

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.wait, task_id, 90)
        # Whether the long-poll is cut off or not yet sent, the kill costs the wait a request.
        time.sleep(0.5)
        api.kill()
        wait_for(lambda: retries_logged(caplog, "GET") >= 1, 20)
        start(started, lambda: start_api(server.url, port=port, wait=False))
        done = waiting.result(timeout=120)

    assert done.status is TaskStatus.DONE
    assert done.task_id == task_id
