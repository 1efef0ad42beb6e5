"""The alert rules read what a real api exports: a real Prometheus sees the right alerts go
pending as tasks wait with no worker, as Redis dies, and as the api disappears.

Only the pending state is awaited: every alert's `for` is minutes long, and the promtool
cases (rules_test.yaml) cover the timing. What this adds is that the expressions match the
series the services really export, with the thresholds the chart renders.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fastapi_redis_mini_harness.processes import Process, start_api
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._prometheus import Prometheus, Target, run_prometheus
from ._services import ready
from ._thresholds import chart_threshold_rules

pytestmark = pytest.mark.slow

RULES = (
    Path(__file__).resolve().parents[2] / "charts/fastapi-redis-mini/files/prometheus/rules.yaml"
)
NAMESPACE, RELEASE = "live", "alerting"
# The smallest queue-wait threshold the chart accepts, so a waiting task crosses it at once.
THRESHOLD = {"metrics": {"slo": {"queueWait": {"thresholdSeconds": 1}}}}


@dataclass
class Live:
    server: RedisServer
    api: Process
    prometheus: Prometheus

    def active(self) -> set[str]:
        """Alerts of this release that are pending or firing."""
        samples = self.prometheus.query(f'ALERTS{{namespace="{NAMESPACE}", release="{RELEASE}"}}')
        return {sample.labels["alertname"].removeprefix("FastapiRedisMini") for sample in samples}

    def wait_active(self, expected: set[str], *, exactly: bool = True) -> None:
        """Wait until the active alerts are `expected` (or include it), for 45 s at most."""
        deadline = time.monotonic() + 45.0
        while True:
            active = self.active()
            if active == expected or (not exactly and expected <= active):
                return
            assert time.monotonic() < deadline, (
                f"active {sorted(active)}, expected {sorted(expected)}"
            )
            time.sleep(0.5)


@pytest.fixture
def live(prometheus_binary: str, tmp_path: Path) -> Iterator[Live]:
    server = RedisServer()
    server.start()
    api = None
    try:
        api = ready(start_api(server.url, wait=False, WEB_CONCURRENCY="1"), "/readyz")
        thresholds = chart_threshold_rules(
            tmp_path / "thresholds.yaml", RELEASE, NAMESPACE, THRESHOLD
        )
        target = Target(
            "api",
            f"127.0.0.1:{api.metrics_port}",
            {"namespace": NAMESPACE, "release": RELEASE, "pod": "api-0"},
        )
        with run_prometheus(
            prometheus_binary, tmp_path, [target], [RULES, thresholds]
        ) as prometheus:
            yield Live(server, api, prometheus)
    finally:
        if api is not None:
            api.close()
        server.close()


def test_alerts_follow_a_real_queue_a_real_redis_outage_and_a_vanished_api(live: Live) -> None:
    # Healthy and idle: nothing pending.
    live.prometheus.wait_for(
        f'fastapi_redis_mini_redis_up{{release="{RELEASE}"}}', lambda s: bool(s), what="scraped"
    )
    time.sleep(3)  # a few evaluations
    assert live.active() == set()

    # Tasks submitted with no worker running: they wait, and the oldest ages past 1 s.
    with httpx.Client(base_url=live.api.base_url, timeout=10.0) as client:
        for _ in range(3):
            answer = client.post("/tasks", json={"prompt": f"live {uuid.uuid4().hex}"})
            assert answer.status_code == 202, answer.text
    live.wait_active({"OldestTaskWaitingTooLong", "TasksWaitingWithoutWorkers"})

    # Redis dies: the queue gauges vanish with it, so only the Redis alert is left.
    live.server.stop(kill=True)
    live.wait_active({"RedisUnavailable"})

    # The api goes too: the release's thresholds remain, its api does not. The Redis alert
    # may stay a while: its error rate still sees the last two minutes of failed reads.
    live.api.close()
    live.wait_active({"ApiAbsent"}, exactly=False)
    assert live.active() <= {"ApiAbsent", "RedisUnavailable"}
