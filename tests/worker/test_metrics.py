"""The worker's labelled series the alerts read exist at 0 before the first task."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from fastapi_redis_mini.worker import metrics


@pytest.mark.parametrize("status", ["DONE", "FAILED", "CANCELLED"])
def test_every_final_status_is_exported_before_the_first_task_ends(status: str) -> None:
    labels = {"status": status}
    assert REGISTRY.get_sample_value("fastapi_redis_mini_tasks_finished_total", labels) is not None


@pytest.mark.parametrize("operation", metrics.REDIS_OPERATIONS)
def test_the_workers_redis_error_series_exist_before_the_first_error(operation: str) -> None:
    labels = {"operation": operation}
    assert REGISTRY.get_sample_value("fastapi_redis_mini_redis_errors_total", labels) is not None


def test_a_dead_process_no_longer_counts_its_tasks_in_flight() -> None:
    assert metrics.tasks_in_flight._multiprocess_mode == "livesum"
