"""The queue gauges a real api exports at scrape time: ages that grow while tasks wait, and
what a scrape says while Redis is down."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._services import ready

pytestmark = pytest.mark.slow

PREFIX = "fastapi_redis_mini_"


def scrape(api: Process) -> dict[str, float]:
    """Sample name (prefix dropped) -> value, for the unlabelled-or-single-series gauges."""
    text = httpx.get(api.metrics_url, timeout=10.0).text
    return {
        sample.name.removeprefix(PREFIX): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels or set(sample.labels) == {"stream", "group"}
    }


def submit(client: httpx.Client, prompt: str, duration: float) -> None:
    response = client.post("/tasks", json={"prompt": prompt, "params": {"duration": duration}})
    assert response.status_code == 202, response.text


@pytest.fixture
def api(redis_url: str) -> Iterator[Process]:
    service = ready(start_api(redis_url, wait=False, WEB_CONCURRENCY="1"), "/readyz")
    yield service
    service.close()


def test_ages_of_waiting_and_pending_tasks_grow_while_they_wait(
    api: Process, redis_url: str
) -> None:
    worker = ready(start_worker(redis_url, wait=False, MAX_CONCURRENCY="1"), "/healthz")
    try:
        with httpx.Client(base_url=api.base_url, timeout=10.0) as client:
            # The worker takes the first task and runs it for 25 s; the other two wait.
            submit(client, f"long {time.time()}", 25)
            deadline = time.monotonic() + 20
            while scrape(api)["stream_pending"] < 1:
                assert time.monotonic() < deadline, worker.log
                time.sleep(0.2)
            submit(client, f"waits {time.time()}", 0.1)
            submit(client, f"waits too {time.time()}", 0.1)
        first = scrape(api)
        time.sleep(3)
        second = scrape(api)
    finally:
        worker.close()
    assert (first["stream_lag"], first["stream_pending"], first["stream_consumers"]) == (2, 1, 1)
    assert first["redis_up"] == 1
    for age in ("stream_oldest_undelivered_age_seconds", "stream_oldest_pending_age_seconds"):
        assert second[age] - first[age] >= 2.5, (age, first[age], second[age])
    assert (
        second["stream_oldest_pending_age_seconds"]
        > second["stream_oldest_undelivered_age_seconds"]
    )


def test_a_scrape_while_redis_is_down_says_so_and_exports_no_stale_queue_gauges() -> None:
    server = RedisServer()
    server.start()
    api = None
    try:
        api = ready(start_api(server.url, wait=False, WEB_CONCURRENCY="1"), "/readyz")
        before = scrape(api)
        assert (before["redis_up"], before["stream_lag"]) == (1, 0)
        server.stop(kill=True)
        during = scrape(api)
        assert during["redis_up"] == 0
        assert not {"stream_lag", "stream_length", "stream_oldest_undelivered_age_seconds"} & set(
            during
        )
        server.start()
        deadline = time.monotonic() + 20
        while scrape(api)["redis_up"] != 1:
            assert time.monotonic() < deadline, "redis_up stayed 0 after Redis came back"
            time.sleep(0.5)
    finally:
        if api is not None:
            api.close()
        server.close()
