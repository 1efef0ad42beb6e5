"""The inference section: a real model (embed) and the simulated accelerator (simulate-batched).

For each: (a) the model called directly in this process at its best batch size, the ceiling;
(b) the service end to end, HTTP submit to DONE, with batching; (c) the same without
batching, one call per task; (d) arq and SAQ running the same work per job at the same
concurrency (the simulated accelerator only: their venv cannot hold the service's model).
For embed also (b2): the batched worker draining a queue filled over HTTP before it started,
which leaves out the api's submit rate that bounds (b) on a small machine.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi_redis_mini.core.embedding import EmbedModel
from fastapi_redis_mini.core.handlers import SimulatedAccelerator
from fastapi_redis_mini_harness.processes import SERVICE_DEFAULTS, Process, Workspace, start_worker
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._e2e import end_to_end, miss_requests
from ._http import send_all
from ._measure import ROOT, tree_cpu_seconds
from ._workers import task_times, wait_idle

CEILING_BATCHES = (1, 8, 32, 64)
BENCH_MODULE = "loadtest.bench._inference"


# -- the unbatched variants the workers load (TASK_HANDLER=loadtest.bench._inference:NAME)


class EmbedPerTask:
    """The embed model called once per task: what batching is measured against."""

    def __init__(self, max_duration: float) -> None:
        self.model = EmbedModel(max_duration)

    def load(self) -> None:
        self.model.load()

    def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        [answer] = self.model([prompt], [params])
        if isinstance(answer, Exception):
            raise answer
        return answer


class AcceleratorPerTask:
    """The simulated accelerator called once per task: the fixed cost per call every time."""

    def __init__(self, max_duration: float) -> None:
        self.device = SimulatedAccelerator(max_duration)

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        [answer] = await self.device([prompt], [params])
        if isinstance(answer, Exception):
            raise answer
        return answer


# -- the measurements


def _texts(count: int) -> list[str]:
    return [f"sentence number {i} about the weather, a cat and a mat" for i in range(count)]


def embed_ceiling(items: int) -> dict[str, Any]:
    """Items a second, the embed model called directly, for each batch size; the best."""
    model = EmbedModel(0)
    model.load()
    texts = _texts(items)
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for size in CEILING_BATCHES:
        began, used = time.perf_counter(), _own_cpu()
        for start in range(0, items, size):
            batch = texts[start : start + size]
            model(batch, [{}] * len(batch))
        rates[str(size)] = items / (time.perf_counter() - began)
        cpu[str(size)] = (_own_cpu() - used) * 1e6 / items
    best = max(rates, key=lambda size: rates[size])
    return {
        "items": items,
        "rates": rates,
        "best_batch": int(best),
        "best_rate": rates[best],
        # Above 1e6 / best_rate, the model used more than one core.
        "cpu_us_per_item": cpu[best],
    }


def accelerator_ceiling(items: int) -> dict[str, Any]:
    """The same for the simulated accelerator (it sleeps, so this is its model, measured)."""
    model = SimulatedAccelerator(0)
    prompts = _texts(items)
    rates: dict[str, float] = {}

    async def run(size: int) -> None:
        for start in range(0, items, size):
            batch = prompts[start : start + size]
            await model(batch, [{}] * len(batch))

    for size in (1, 8, 32):
        began = time.perf_counter()
        asyncio.run(run(size))
        rates[str(size)] = items / (time.perf_counter() - began)
    best = max(rates, key=lambda size: rates[size])
    return {"items": items, "rates": rates, "best_batch": int(best), "best_rate": rates[best]}


def service_run(
    space: Workspace,
    redis_server: RedisServer,
    start_api: Callable[[str], Process],
    *,
    handler: str,
    label: str,
    tasks: int,
    concurrency: int,
) -> dict[str, Any]:
    """One api and one worker running `handler`; `tasks` submitted at once over HTTP."""
    redis_server.flush()
    api = start_api(f"api-{label}")
    worker = _worker(space, redis_server, handler, label, concurrency)
    try:
        worker.wait_until_answers("/readyz", timeout=60)  # loaded
        pids = {"api": api.pid, "worker": worker.pid, "redis": redis_server.pid}
        before = _cpu(pids)
        result = end_to_end(api, redis_server.url, tasks, label=label, params={})
        after = _cpu(pids)
    finally:
        worker.stop()
        api.stop()
    # Where the machine's cores went, per task: the api (all its processes), the worker (the
    # model included), Redis, and this process (the HTTP client, then polling for DONE).
    result["cpu_us_per_task"] = {part: (after[part] - before[part]) * 1e6 / tasks for part in after}
    result["handler"] = handler
    result["rate"] = result["done"] / result["all_done_seconds"] if result["done"] else 0.0
    return result


def drain_run(
    space: Workspace,
    redis_server: RedisServer,
    start_api: Callable[[str], Process],
    *,
    handler: str,
    label: str,
    tasks: int,
    concurrency: int,
) -> dict[str, Any]:
    """`tasks` queued over HTTP with no worker, then one worker running `handler` drains them:
    tasks/s from the first task started to the last DONE."""
    redis_server.flush()
    api = start_api(f"api-{label}")
    try:
        requests = miss_requests(api.port, tasks, label, {})
        answers = asyncio.run(send_all("127.0.0.1", api.port, requests, 100))
    finally:
        api.stop()
    ids = [json.loads(body)["task_id"] for status, body in answers if status == 202]
    worker = _worker(space, redis_server, handler, label, concurrency)
    try:
        worker.wait_until_answers("/readyz", timeout=60)
        asyncio.run(wait_idle(redis_server.url, time.perf_counter() + 300))
        times = asyncio.run(task_times(redis_server.url, ids))
    finally:
        worker.stop()
    first_start = min((started for _, started, _ in times), default=0.0)
    last_finish = max((finished for _, _, finished in times), default=0.0)
    seconds = last_finish - first_start
    return {
        "handler": handler,
        "tasks": tasks,
        "done": len(times),
        "drain_seconds": seconds,
        "rate": len(times) / seconds if seconds > 0 else 0.0,
    }


def _own_cpu() -> float:
    """CPU seconds so far of this process, all its threads."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _cpu(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process (with its children), and of this one as `bench`."""
    return {**{part: tree_cpu_seconds(pid) for part, pid in pids.items()}, "bench": _own_cpu()}


def _worker(
    space: Workspace, redis_server: RedisServer, handler: str, label: str, concurrency: int
) -> Process:
    return space.own(
        start_worker(
            redis_server.url,
            {"MAX_CONCURRENCY": str(concurrency), "LOG_LEVEL": "WARNING", "TASK_HANDLER": handler},
            wait=False,
            defaults=SERVICE_DEFAULTS,
            name=f"worker-{label}",
            log_path=space.log_path(f"worker-{label}"),
            cwd=ROOT,
        )
    )
