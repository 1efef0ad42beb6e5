"""What the api's and the worker's metrics share: naming, buckets, exposition.

Each service defines its own metrics next to its code (api/metrics.py, worker/metrics.py), so
neither exports the other's series. Under gunicorn the api runs several processes;
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR) lets each of them count into
shared files, and /metrics merges them.
The queue-depth gauges are not kept here: they are read from Redis at scrape time.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..queue import QueueStats

NAMESPACE = "fastapi_redis_mini"

# The *_created series double the exposition for no use to dashboards or alerts.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Latency buckets from 1 ms (an api call) to 10 minutes (a long inference task).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
            120, 300, 600)  # fmt: skip

# -- both services
redis_errors = Counter(
    "redis_errors", "Redis calls that failed, by operation.", ["operation"], namespace=NAMESPACE
)


class QueueStateCollector(Collector):
    """Exposes one reading of the queue's depth, taken from Redis just before the scrape."""

    def __init__(self, stats: QueueStats) -> None:
        self.stats = stats
        self.labels = [stats.stream, stats.group]

    def collect(self) -> list[GaugeMetricFamily]:
        families = []
        for name, doc, value in (
            ("stream_length", "Entries in the task stream (XLEN).", self.stats.stream_length),
            ("stream_lag", "Entries not yet delivered to the consumer group.", self.stats.lag),
            ("stream_pending", "Entries delivered but not yet acknowledged.", self.stats.pending),
            ("dead_letter_length", "Entries in the dead-letter stream.",
             self.stats.dead_letter_length),
        ):  # fmt: skip
            family = GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=["stream", "group"])
            family.add_metric(self.labels, value)
            families.append(family)
        return families


def render(multiprocess_dir: str | None, extra: Collector | None = None) -> tuple[bytes, str]:
    """The exposition text of this process, or of all processes in multiprocess mode."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    output = generate_latest(registry)
    if extra is not None:
        side = CollectorRegistry()
        side.register(extra)
        output += generate_latest(side)
    return output, CONTENT_TYPE_LATEST


def mark_process_dead(pid: int, multiprocess_dir: str | None) -> None:
    """Tell multiprocess mode that a gunicorn worker exited, so its live gauges are dropped."""
    if multiprocess_dir:
        _multiprocess.mark_process_dead(pid, multiprocess_dir)  # type: ignore[no-untyped-call]
