"""The worker's metrics: outcomes, the time tasks wait and run, and recovery counts."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ..core.models import TaskStatus
from ..core.telemetry.metrics import (
    END_TO_END_BUCKETS,
    NAMESPACE,
    QUEUE_WAIT_BUCKETS,
    RUN_BUCKETS,
    redis_errors,
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
# livesum: a process that exited no longer counts its tasks as running.
tasks_in_flight = Gauge(
    "tasks_in_flight",
    "Tasks this worker is running.",
    namespace=NAMESPACE,
    multiprocess_mode="livesum",
)
worker_concurrency_limit = Gauge(
    "worker_concurrency_limit",
    "MAX_CONCURRENCY of this worker.",
    namespace=NAMESPACE,
    multiprocess_mode="max",
)
tasks_reclaimed = Counter(
    "tasks_reclaimed",
    "Idle entries claimed and taken on: a stopped worker's, or ones a lost read delivered.",
    namespace=NAMESPACE,
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
batch_size = Histogram(
    "handler_batch_size",
    "Tasks per call of a batched handler.",
    namespace=NAMESPACE,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
batch_wait = Histogram(
    "handler_batch_wait_seconds",
    "Time a batch waited for items, from its first to its call (at most max_batch_wait_ms).",
    namespace=NAMESPACE,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
# Set by the worker for every partition once it consumes: one series, partition "0", on a
# single partition too, so dashboards and alerts read the same name everywhere.
partition_writable = Gauge(
    "partition_writable",
    "1 while a partition takes this worker's outcomes, 0 while it refuses them (its master is "
    "unreachable, its slots are down, or it has no replica to confirm with DURABLE_ACKS).",
    ["partition"],
    namespace=NAMESPACE,
    multiprocess_mode="livemin",
)

# Every labelled series exists at 0 from the first scrape: a counter whose first sample is
# already 1 hides that increment from rate() and increase(), so the first failure of a fresh
# worker would never reach the alerts. tasks_finished's are kept by status, looked up once:
# labels() costs a lock and a tuple per call.
tasks_finished_as = {s.value: tasks_finished.labels(s.value) for s in TaskStatus if s.is_final}
REDIS_OPERATIONS = ("ensure_group", "start", "read", "finish", "keep_alive", "maintenance")
for _operation in REDIS_OPERATIONS:
    redis_errors.labels(_operation)
webhook_deliveries = Counter(
    "webhook_deliveries",
    "Webhook delivery attempts by outcome: delivered, retried, dead_lettered.",
    ["outcome"],
    namespace=NAMESPACE,
)
