"""An api with several gunicorn processes counts every request exactly once in /metrics."""

from __future__ import annotations

import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from fastapi_redis_mini_harness.http import tls_context
from fastapi_redis_mini_harness.processes import start_api

from ._services import ready

pytestmark = pytest.mark.slow

PROCESSES = 3
REQUESTS = 300
ROUTE = "/tasks/{task_id}"


def scrape(metrics_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from one GET /metrics."""
    text = httpx.get(metrics_url, timeout=10.0).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def lookups(base_url: str) -> None:
    """GET unknown task ids, one new connection each, so the processes share the work."""

    def one(_: int) -> int:
        # A client of its own per request: threads sharing one pool that keeps no connection
        # race on closing them (a read on a closed socket, "Bad file descriptor").
        url = f"{base_url}/tasks/{uuid.uuid4().hex}"
        return httpx.get(url, timeout=10.0, verify=tls_context()).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = Counter(pool.map(one, range(REQUESTS)))
    assert statuses == {404: REQUESTS}


def requests_per_process(metrics_dir: Path) -> dict[str, float]:
    """pid -> 404 lookups that process counted, read from its multiprocess file."""
    counted: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
            if f'"route": "{ROUTE}"' in key and '"status": "404"' in key:
                counted[pid] = counted.get(pid, 0.0) + value
    return counted


def test_requests_through_three_processes_are_counted_exactly_once(
    redis_url: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    api = ready(
        start_api(
            redis_url,
            wait=False,
            WEB_CONCURRENCY=str(PROCESSES),
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        ),
        "/readyz",
    )
    try:
        labels = (("method", "GET"), ("route", ROUTE), ("status", "404"))
        before = scrape(api.metrics_url)
        # Pre-initialised at 0 (api/metrics.py), so the first request's increment is seen.
        assert before[("fastapi_redis_mini_http_requests_total", labels)] == 0

        # Which process accepts a connection is the kernel's choice, and on a busy machine one
        # process can win every accept of a round. The count is only meaningful once more than
        # one process has served requests, so send rounds until they have (at most five).
        sent = 0
        for _ in range(5):
            lookups(api.base_url)
            sent += REQUESTS
            if len([count for count in requests_per_process(metrics_dir).values() if count]) > 1:
                break

        after = scrape(api.metrics_url)
        # The process that answered describes itself, as a single-process api does.
        assert after[("process_resident_memory_bytes", ())] > 0
        assert after[("process_start_time_seconds", ())] > 0
        assert after[("fastapi_redis_mini_http_requests_total", labels)] == sent
        assert after[("fastapi_redis_mini_http_request_duration_seconds_count", labels)] == sent
        raw_paths = [labels for _, labels in after if any("/tasks/" in v and "{" not in v
                                                          for _, v in labels)]  # fmt: skip
        assert not raw_paths, f"raw paths leaked into labels: {raw_paths[:3]}"

        # The total is only meaningful if more than one process served the requests.
        per_process = requests_per_process(metrics_dir)
        assert sum(per_process.values()) == sent, per_process
        assert len([count for count in per_process.values() if count]) >= 2, per_process
    finally:
        api.close()
