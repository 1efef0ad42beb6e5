"""The api's labelled series the alerts read exist at 0 before the first request."""

from __future__ import annotations

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
