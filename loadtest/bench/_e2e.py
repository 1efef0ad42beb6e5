"""End to end over HTTP, and memory after many tasks."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from fastapi_redis_mini_harness.processes import Process
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._http import post_request, send_all
from ._measure import rss_kib, tree_rss_kib
from ._workers import task_times, wait_idle

E2E_CONNECTIONS = 100


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(pct * 10) - 1]


def miss_requests(
    port: int, tasks: int, label: str, params: dict[str, Any] | None = None
) -> list[bytes]:
    """POST /tasks requests with prompts never sent before: each one queues a task."""
    run_id = time.time_ns()
    body_params = {"duration": 0} if params is None else params
    return [
        post_request(
            "127.0.0.1",
            port,
            "/tasks",
            json.dumps({"prompt": f"{label} {run_id} {i}", "params": body_params}).encode(),
        )
        for i in range(tasks)
    ]


def end_to_end(
    api: Process,
    url: str,
    tasks: int,
    timeout: float = 300.0,
    *,
    label: str = "e2e",
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Submit `tasks` tasks (no-op ones by default) at once over HTTP; time until every one
    is DONE."""
    requests = miss_requests(api.port, tasks, label, params)
    began_wall = time.time()
    began = time.perf_counter()
    answers = asyncio.run(send_all("127.0.0.1", api.port, requests, E2E_CONNECTIONS))
    submitted_in = time.perf_counter() - began
    ids = [json.loads(body)["task_id"] for status, body in answers if status == 202]
    refused = len(answers) - len(ids)
    asyncio.run(wait_idle(url, began + timeout))
    times = asyncio.run(task_times(url, ids))
    to_done = [finished - created for created, _, finished in times]
    queue_wait = [started - created for created, started, _ in times]
    last_finish = max((finished for _, _, finished in times), default=began_wall)
    return {
        "tasks": tasks,
        "accepted": len(ids),
        "refused": refused,
        "done": len(times),
        "submit_seconds": submitted_in,
        "submit_rate": tasks / submitted_in if submitted_in > 0 else 0.0,
        "all_done_seconds": last_finish - began_wall,
        "time_to_done_p50": percentile(to_done, 50),
        "time_to_done_p99": percentile(to_done, 99),
        "queue_wait_p50": percentile(queue_wait, 50),
        "queue_wait_p99": percentile(queue_wait, 99),
    }


def memory_after(
    api: Process, worker: Process, redis_server: RedisServer, url: str, tasks: int
) -> dict[str, Any]:
    """Push `tasks` cache misses through the api with a worker running, then read memory;
    then send every request again (all cache hits) and read Redis's memory once more."""
    before = {
        "api_rss_kib": tree_rss_kib(api.pid),
        "worker_rss_kib": rss_kib(worker.pid),
        "redis_used_memory": redis_server.used_memory(),
    }
    requests = miss_requests(api.port, tasks, "memory")
    answers = asyncio.run(send_all("127.0.0.1", api.port, requests, 100))
    accepted = sum(1 for status, _ in answers if status == 202)
    asyncio.run(wait_idle(url, time.perf_counter() + 300))
    after = {
        "api_rss_kib": tree_rss_kib(api.pid),
        "worker_rss_kib": rss_kib(worker.pid),
        "redis_used_memory": redis_server.used_memory(),
    }
    # Then as many cache hits, every one of the prompts again: a hit must store nothing.
    hit_answers = asyncio.run(send_all("127.0.0.1", api.port, requests, 100))
    hits = sum(1 for status, _ in hit_answers if status == 200)
    after_hits = {**after, "redis_used_memory": redis_server.used_memory()}
    return {
        "tasks": accepted,
        "hits": hits,
        "before": before,
        "after": after,
        "after_hits": after_hits,
        "redis_bytes_per_task": (after["redis_used_memory"] - before["redis_used_memory"])
        / max(1, accepted),
        "redis_bytes_per_hit": (after_hits["redis_used_memory"] - after["redis_used_memory"])
        / max(1, hits),
    }
