"""The mapping and retry rules on their own: codes no running service sends yet, delays."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from fastapi_redis_mini.api import errors as service_errors
from fastapi_redis_mini_client import (
    APIError,
    NotFoundError,
    RateLimitedError,
    RequestRefusedError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    UnexpectedResponseError,
)
from fastapi_redis_mini_client._core import task_of
from fastapi_redis_mini_client.errors import error_class, error_from_response, retry_after_seconds


def _service_error_types() -> Iterator[type[service_errors.ServiceError]]:
    pending = [service_errors.ServiceError]
    while pending:
        kind = pending.pop()
        pending.extend(kind.__subclasses__())
        yield kind


@pytest.mark.parametrize("error_type", list(_service_error_types()), ids=lambda kind: kind.__name__)
def test_every_service_error_type_maps_to_its_status_class(
    error_type: type[service_errors.ServiceError],
) -> None:
    # Codes added to the service later land here too: each must map at least to the class
    # of its status, so callers' handlers and the retry rules apply to it.
    status, code = error_type.status_code, error_type.code
    mapped = error_class(status, code)
    assert issubclass(mapped, error_class(status, "a code nobody knows"))
    assert mapped.retryable == (status in {429, 502, 503, 504})


@pytest.mark.parametrize("code", sorted(code for code, _ in service_errors.UNAVAILABLE.values()))
def test_every_state_of_redis_the_service_names_is_a_retried_unavailable_error(
    code: str,
) -> None:
    mapped = error_class(503, code)
    assert issubclass(mapped, ServiceUnavailableError)
    assert mapped.retryable


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (503, "redis_out_of_memory", ServiceUnavailableError),
        (503, "redis_read_only", ServiceUnavailableError),
        (429, "quota_exceeded", RateLimitedError),
        (404, "route_gone", NotFoundError),
        (418, "teapot", RequestRefusedError),
        (507, "insufficient_storage", ServerError),
        (302, "found", APIError),
    ],
)
def test_an_unknown_code_gets_the_class_of_its_status(
    status: int, code: str, expected: type[APIError]
) -> None:
    assert error_class(status, code) is expected


def test_a_gateways_html_error_is_a_retryable_unavailable_error() -> None:
    # What a proxy in front answers while the api restarts: no JSON, no error shape.
    answer = httpx.Response(502, text="<html>Bad Gateway</html>", headers={"Retry-After": "1"})
    error = error_from_response(answer)
    assert isinstance(error, ServiceUnavailableError)
    assert error.retryable
    assert (error.code, error.retry_after) == ("http_502", 1.0)
    assert "Bad Gateway" in error.message


def test_retry_after_is_read_in_either_form() -> None:
    in_ten_seconds = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    from_date = retry_after_seconds(in_ten_seconds)
    assert from_date is not None
    assert 8.0 <= from_date <= 10.0
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(format_datetime(datetime(2001, 1, 1, tzinfo=UTC))) == 0.0
    for nonsense in ("soon", "-1", "nan", None):
        assert retry_after_seconds(nonsense) is None


def test_the_backoff_doubles_to_its_cap_and_never_undercuts_retry_after() -> None:
    policy = RetryPolicy(backoff=0.5, backoff_max=4.0)
    longest = [policy.delay(retry, None, lambda: 1.0) for retry in range(1, 6)]
    assert longest == [0.5, 1.0, 2.0, 4.0, 4.0]
    shortest = [policy.delay(retry, None, lambda: 0.0) for retry in range(1, 6)]
    assert shortest == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert policy.delay(1, 3.0, lambda: 0.0) == 3.0
    assert policy.delay(1, 3.0, lambda: 1.0) == 3.75


def test_clients_told_the_same_retry_after_come_back_spread_out() -> None:
    policy = RetryPolicy()
    delays = [policy.delay(1, 2.0, random.Random(seed).random) for seed in range(50)]
    assert min(delays) >= 2.0
    assert max(delays) <= 2.5
    assert max(delays) - min(delays) > 0.25  # not in lockstep


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"attempts": 0}, "attempts"),
        ({"backoff": -1.0}, "backoff"),
        ({"backoff_max": math.nan}, "backoff_max"),
    ],
)
def test_a_bad_retry_policy_fails_naming_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^RetryPolicy.{field} must be"):
        RetryPolicy(**options)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>a login page</html>"),
        httpx.Response(200, json={"status": "ok"}),
        httpx.Response(200, json={"task_id": "abc", "status": "SLEEPING"}),
        httpx.Response(200, json=["not", "an", "object"]),
    ],
    ids=["html", "no-task-id", "unknown-status", "a-list"],
)
def test_a_success_answer_that_is_not_a_task_is_an_unexpected_response(
    answer: httpx.Response,
) -> None:
    with pytest.raises(UnexpectedResponseError) as raised:
        task_of(answer)
    assert raised.value.status_code == 200
