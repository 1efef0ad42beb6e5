"""The api's metrics: requests by route template, and what became of submissions."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from ..core.telemetry.metrics import HTTP_BUCKETS, NAMESPACE

http_requests = Counter(
    "http_requests", "HTTP requests answered.", ["method", "route", "status"], namespace=NAMESPACE
)
http_request_duration = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route", "status"],
    namespace=NAMESPACE,
    buckets=HTTP_BUCKETS,
)
tasks_submitted = Counter(
    "tasks_submitted",
    "Task submissions by outcome: queued, cached, duplicate (Idempotency-Key) or rejected.",
    ["outcome"],
    namespace=NAMESPACE,
)
cache_hits = Counter(
    "cache_hits", "Submissions answered from the result cache.", namespace=NAMESPACE
)
cache_misses = Counter("cache_misses", "Submissions that had to be queued.", namespace=NAMESPACE)
