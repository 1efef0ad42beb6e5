"""The worker's metrics: outcomes, the time tasks wait and run, and recovery counts."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ..core.telemetry.metrics import (
    END_TO_END_BUCKETS,
    NAMESPACE,
    QUEUE_WAIT_BUCKETS,
    RUN_BUCKETS,
)

tasks_finished = Counter(
    "tasks_finished", "Tasks finished, by final status.", ["status"], namespace=NAMESPACE
)
task_queue_wait = Histogram(
    "task_queue_wait_seconds",
    "Time from submit to start.",
    namespace=NAMESPACE,
    buckets=QUEUE_WAIT_BUCKETS,
)
task_run = Histogram(
    "task_run_seconds", "Time from start to finish.", namespace=NAMESPACE, buckets=RUN_BUCKETS
)
task_end_to_end = Histogram(
    "task_end_to_end_seconds",
    "Time from submit to finish.",
    namespace=NAMESPACE,
    buckets=END_TO_END_BUCKETS,
)
tasks_in_flight = Gauge(
    "tasks_in_flight", "Tasks this worker is running.", namespace=NAMESPACE, multiprocess_mode="sum"
)
worker_concurrency_limit = Gauge(
    "worker_concurrency_limit",
    "MAX_CONCURRENCY of this worker.",
    namespace=NAMESPACE,
    multiprocess_mode="max",
)
tasks_reclaimed = Counter(
    "tasks_reclaimed", "Entries taken over from a worker that stopped.", namespace=NAMESPACE
)
tasks_retried = Counter("tasks_retried", "Runs that failed and were retried.", namespace=NAMESPACE)
tasks_dead_lettered = Counter(
    "tasks_dead_lettered", "Tasks moved to the dead-letter stream.", namespace=NAMESPACE
)
event_loop_blocks = Counter(
    "event_loop_blocks",
    "Times the worker's event loop was held longer than LOOP_BLOCK_LIMIT, by handler.",
    ["handler"],
    namespace=NAMESPACE,
)
event_loop_block = Histogram(
    "event_loop_block_seconds",
    "How long each such block lasted, by handler.",
    ["handler"],
    namespace=NAMESPACE,
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
