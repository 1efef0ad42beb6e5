"""The api's labelled series the alerts read exist at 0 before the first request."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import REGISTRY

from fastapi_redis_mini.api import metrics


@pytest.mark.parametrize(
    ("method", "route", "status"),
    [(m, r, s) for m, r, statuses in metrics.SLO_SERIES for s in statuses],
)
def test_the_objectives_series_are_exported_at_zero_before_any_request(
    method: str, route: str, status: str
) -> None:
    labels = {"method": method, "route": route, "status": status}
    assert REGISTRY.get_sample_value("fastapi_redis_mini_http_requests_total", labels) is not None
    assert (
        REGISTRY.get_sample_value("fastapi_redis_mini_http_request_duration_seconds_count", labels)
        is not None
    )


@pytest.mark.parametrize("operation", ["api", "metrics"])
def test_the_apis_redis_error_series_exist_before_the_first_error(operation: str) -> None:
    labels = {"operation": operation}
    assert REGISTRY.get_sample_value("fastapi_redis_mini_redis_errors_total", labels) is not None


async def test_a_long_poll_is_counted_apart_from_a_plain_read(client: httpx.AsyncClient) -> None:
    def count(route: str) -> float:
        labels = {"method": "GET", "route": route, "status": "404"}
        return REGISTRY.get_sample_value("fastapi_redis_mini_http_requests_total", labels) or 0.0

    read, poll = "/tasks/{task_id}", "/tasks/{task_id}" + metrics.LONG_POLL_SUFFIX
    before = count(read), count(poll)
    assert (await client.get("/tasks/no-such-task")).status_code == 404
    assert (await client.get("/tasks/no-such-task", params={"wait": 1})).status_code == 404
    assert (count(read), count(poll)) == (before[0] + 1, before[1] + 1)
