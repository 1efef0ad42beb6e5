"""Every error code the service answers with maps to its exception, provoked on the real api."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from fastapi_redis_mini_client import (
    BacklogFullError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RedisUnavailableError,
    RequestRefusedError,
    RetryPolicy,
    ServiceUnavailableError,
    ServiceUnreachableError,
    TaskNotFoundError,
    TooManyUnfinishedError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from fastapi_redis_mini_client.errors import error_from_response
from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.processes import Process, start_api
from fastapi_redis_mini_harness.redis_server import RedisServer

from .conftest import API_KEY, BlockingClient, Connect, Stack

pytestmark = pytest.mark.slow

ONCE = RetryPolicy(attempts=1)


def test_unauthorized(connect: Connect, stack: Stack) -> None:
    with pytest.raises(UnauthorizedError) as raised:
        connect(stack.api.base_url, "not-a-key").submit("x")
    assert (raised.value.status_code, raised.value.code) == (401, "unauthorized")


def test_task_not_found(client: BlockingClient) -> None:
    with pytest.raises(TaskNotFoundError) as raised:
        client.get("f" * 32)
    assert (raised.value.status_code, raised.value.code) == (404, "task_not_found")


def test_a_wrong_base_url_is_not_found_but_not_task_not_found(
    connect: Connect, stack: Stack
) -> None:
    with pytest.raises(NotFoundError) as raised:
        connect(stack.api.base_url + "/v9").get("f" * 32)
    assert not isinstance(raised.value, TaskNotFoundError)
    assert (raised.value.status_code, raised.value.code) == (404, "not_found")


def test_conflict(client: BlockingClient) -> None:
    task_id = client.submit(f"finished {uuid.uuid4().hex}").task_id
    client.wait(task_id, timeout=20)
    with pytest.raises(ConflictError) as raised:
        client.cancel(task_id)
    assert (raised.value.status_code, raised.value.code) == (409, "conflict")


def test_payload_too_large(client: BlockingClient) -> None:
    with pytest.raises(PayloadTooLargeError) as raised:
        client.submit("x" * 70_000)  # above MAX_BODY_BYTES (64 KiB)
    assert (raised.value.status_code, raised.value.code) == (413, "payload_too_large")


def test_invalid_request_names_the_field(client: BlockingClient) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        client.submit("x", {"duration": "soon"})
    assert (raised.value.status_code, raised.value.code) == (422, "invalid_request")
    assert raised.value.message.startswith("params.duration")


def test_answers_the_client_never_provokes_map_too(stack: Stack) -> None:
    # The client always sends JSON to routes that exist; other clients do not.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=stack.api.base_url, headers=headers, timeout=10) as http:
        not_json = http.post("/tasks", content=b"prompt=x", headers={"content-type": "text/plain"})
        wrong_method = http.put("/tasks/" + "f" * 32, json={})
    unsupported = error_from_response(not_json)
    assert isinstance(unsupported, UnsupportedMediaTypeError)
    assert unsupported.code == "unsupported_media_type"
    not_allowed = error_from_response(wrong_method)
    assert type(not_allowed) is RequestRefusedError
    assert (not_allowed.status_code, not_allowed.code) == (405, "method_not_allowed")


@pytest.fixture(scope="module")
def no_redis_api() -> Iterator[Process]:
    """An api whose Redis does not exist: every task route answers 503."""
    api = start_api(f"redis://127.0.0.1:{free_port()}/0", wait=False)
    try:
        api.wait_until_answers("/healthz", timeout=40)
        yield api
    finally:
        api.close()


def test_redis_unavailable_is_retried_then_raised(connect: Connect, no_redis_api: Process) -> None:
    client = connect(no_redis_api.base_url, None, retry=RetryPolicy(attempts=2, backoff=0.1))
    began = time.monotonic()
    with pytest.raises(RedisUnavailableError) as raised:
        client.submit("x")
    waited = time.monotonic() - began
    error = raised.value
    assert isinstance(error, ServiceUnavailableError)
    assert (error.status_code, error.code) == (503, "redis_unavailable")
    assert error.attempts == 2
    # The retry waited out the answer's Retry-After, not the much shorter backoff.
    assert error.retry_after is not None
    assert error.retry_after > 0
    assert waited >= error.retry_after


def test_a_retry_after_above_the_policy_is_raised_at_once(
    connect: Connect, no_redis_api: Process
) -> None:
    client = connect(no_redis_api.base_url, None, retry=RetryPolicy(retry_after_max=0.5))
    with pytest.raises(RedisUnavailableError) as raised:
        client.get("f" * 32)
    assert raised.value.attempts == 1


@pytest.fixture(scope="module")
def full_redis_api() -> Iterator[Process]:
    """An api whose Redis is out of memory: it refuses every write."""
    server = RedisServer()
    server.start()
    api = start_api(server.url, wait=False)
    try:
        api.wait_until_answers("/readyz", timeout=40)
        redis = server.client()
        redis.config_set("maxmemory", "1")
        redis.close()
        yield api
    finally:
        api.close()
        server.close()


def test_a_503_code_the_client_has_no_class_for_is_a_service_unavailable_error(
    connect: Connect, full_redis_api: Process
) -> None:
    with pytest.raises(ServiceUnavailableError) as raised:
        connect(full_redis_api.base_url, None, retry=ONCE).submit("x")
    error = raised.value
    assert type(error) is ServiceUnavailableError
    assert (error.status_code, error.code) == (503, "redis_out_of_memory")
    assert error.retryable
    assert error.retry_after is not None


@pytest.fixture(scope="module")
def backlog_api(stack: Stack) -> Iterator[Process]:
    """An api on its own key prefix, which no worker reads, that refuses above one task."""
    api = start_api(stack.redis.url, KEY_PREFIX=f"backlog-{uuid.uuid4().hex}:", MAX_BACKLOG="1")
    try:
        yield api
    finally:
        api.close()


def test_backlog_full(connect: Connect, backlog_api: Process) -> None:
    client = connect(backlog_api.base_url, None, retry=ONCE)
    refused: BacklogFullError | None = None
    for n in range(30):  # the api reads the backlog at most once a second: 2 s are enough
        try:
            client.submit(f"fill {n} {uuid.uuid4().hex}")
        except BacklogFullError as error:
            refused = error
            break
        time.sleep(0.2)
    assert refused is not None, "no 429 after 30 submits"
    assert isinstance(refused, RateLimitedError)
    assert (refused.status_code, refused.code) == (429, "backlog_full")
    assert refused.retry_after is not None


def start_quota_api(stack: Stack, **env: str) -> Process:
    """An api with per-key quotas on its own key prefix, which no worker reads."""
    return start_api(
        stack.redis.url, {"API_KEYS": API_KEY, "KEY_PREFIX": f"quota-{uuid.uuid4().hex}:", **env}
    )


@pytest.fixture(scope="module")
def rate_api(stack: Stack) -> Iterator[Process]:
    api = start_quota_api(stack, SUBMIT_RATE_PER_KEY="0.01", SUBMIT_BURST_PER_KEY="1")
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="module")
def unfinished_api(stack: Stack) -> Iterator[Process]:
    api = start_quota_api(stack, MAX_UNFINISHED_PER_KEY="1")
    try:
        yield api
    finally:
        api.close()


def test_rate_limited_with_a_long_retry_after_is_raised_at_once(
    connect: Connect, rate_api: Process
) -> None:
    # One submit a 100 s: the Retry-After is above the policy's 30 s, so no retry waits it out.
    client = connect(rate_api.base_url, retry=RetryPolicy())
    with contextlib.suppress(RateLimitedError):
        client.submit(f"spends the burst {uuid.uuid4().hex}")  # (the other kind spent it)
    began = time.monotonic()
    with pytest.raises(RateLimitedError) as raised:
        client.submit(f"over the rate {uuid.uuid4().hex}")
    assert time.monotonic() - began < 5.0
    error = raised.value
    assert type(error) is RateLimitedError
    assert (error.status_code, error.code, error.attempts) == (429, "rate_limited", 1)
    assert error.retry_after is not None
    assert error.retry_after > 30


def test_too_many_unfinished(connect: Connect, unfinished_api: Process) -> None:
    client = connect(unfinished_api.base_url, retry=ONCE)
    with contextlib.suppress(TooManyUnfinishedError):
        client.submit(f"never runs {uuid.uuid4().hex}")  # (the other kind's may be there)
    with pytest.raises(TooManyUnfinishedError) as raised:
        client.submit(f"one too many {uuid.uuid4().hex}")
    assert isinstance(raised.value, RateLimitedError)
    assert (raised.value.status_code, raised.value.code) == (429, "too_many_unfinished")


def test_no_answer_at_all_is_service_unreachable(connect: Connect) -> None:
    client = connect(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=3, backoff=0))
    with pytest.raises(ServiceUnreachableError) as raised:
        client.get("f" * 32)
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert "no answer in 3 attempt(s)" in str(raised.value)
