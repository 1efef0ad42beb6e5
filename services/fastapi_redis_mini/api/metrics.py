"""The api's metrics: requests by route template, and what became of submissions."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from ..core.telemetry.metrics import HTTP_BUCKETS, NAMESPACE, redis_errors

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

# A GET /tasks/{task_id}?wait=S is labelled with this suffix on its route: it takes up to S
# on purpose, and its time would hide the reads' own latency.
LONG_POLL_SUFFIX = "?wait"

# The series the objectives and alerts divide exist at 0 from the first scrape: a counter
# whose first sample is already 1 hides that increment from rate(), so a fresh replica's
# first errors would never count.
SLO_SERIES = (
    ("POST", "/tasks", ("202", "429", "500", "503")),
    ("GET", "/tasks/{task_id}", ("200", "404", "500", "503")),
    ("GET", "/tasks/{task_id}?wait", ("200", "404", "500", "503")),
)
for _method, _route, _statuses in SLO_SERIES:
    for _status in _statuses:
        http_requests.labels(_method, _route, _status)
        http_request_duration.labels(_method, _route, _status)
for _operation in ("api", "metrics"):
    redis_errors.labels(_operation)
