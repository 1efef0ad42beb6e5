"""Drive arq and SAQ for the worker-throughput benchmark.

Runs inside the bench venv (.venv-bench), never the project venv: arq needs redis<6.
Every subcommand prints one JSON object on stdout so the harness can parse it.

    peers.py enqueue arq --redis-url URL --jobs N
    peers.py work    arq --redis-url URL --jobs N --concurrency C
    peers.py stats   arq --redis-url URL --jobs N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

ENQUEUE_CHUNK = 500
QUEUE_NAME = "bench"
MAX_RUN_SECONDS = 600


def job_ids(jobs: int) -> list[str]:
    return [f"bench-{i}" for i in range(jobs)]


async def noop(ctx: Any) -> None:
    """The benchmark job: does nothing, so only the queue's own cost is measured."""


# The service's simulated accelerator (core/handlers.py SimulatedAccelerator), one job per
# call: its fixed cost per call plus its cost per item. The same numbers; this venv cannot
# import the service.
ACCELERATOR_CALL_SECONDS = 0.02
ACCELERATOR_ITEM_SECONDS = 0.0005


_device: asyncio.Lock | None = None


async def accelerator(ctx: Any) -> None:
    """A job that calls the simulated accelerator for itself alone, as arq and SAQ do: one
    call at a time per process, as on one device."""
    global _device
    if _device is None:
        _device = asyncio.Lock()
    async with _device:
        await asyncio.sleep(ACCELERATOR_CALL_SECONDS + ACCELERATOR_ITEM_SECONDS)


JOBS: dict[str, Callable[[Any], Awaitable[None]]] = {"noop": noop, "accelerator": accelerator}


async def in_chunks(calls: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    results: list[Any] = []
    for start in range(0, len(calls), ENQUEUE_CHUNK):
        chunk = calls[start : start + ENQUEUE_CHUNK]
        results.extend(await asyncio.gather(*(call() for call in chunk)))
    return results


# --- arq -----------------------------------------------------------------------------


async def arq_enqueue(url: str, jobs: int, job: str) -> int:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(url), default_queue_name=QUEUE_NAME)
    try:
        calls = [
            (lambda job_id=job_id: pool.enqueue_job(job, _job_id=job_id))
            for job_id in job_ids(jobs)
        ]
        done = await in_chunks(calls)
    finally:
        await pool.aclose()
    return sum(1 for job in done if job is not None)


async def arq_work(url: str, jobs: int, concurrency: int, poll_delay: float, job: str) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    worker = Worker(
        functions=[func(JOBS[job], name=job)],
        redis_settings=RedisSettings.from_dsn(url),
        queue_name=QUEUE_NAME,
        max_jobs=concurrency,
        burst=True,
        handle_signals=False,
        poll_delay=poll_delay,
    )
    try:
        await worker.main()
    finally:
        await worker.close()


async def arq_stats(url: str, jobs: int) -> dict[str, Any]:
    from arq.connections import RedisSettings, create_pool
    from arq.constants import result_key_prefix
    from arq.jobs import deserialize_result

    pool = await create_pool(RedisSettings.from_dsn(url))
    try:
        raw = await pool.mget([result_key_prefix + job_id for job_id in job_ids(jobs)])
    finally:
        await pool.aclose()
    starts: list[float] = []
    finishes: list[float] = []
    for item in raw:
        if item is None:
            continue
        result = deserialize_result(item)
        if result.success:
            starts.append(result.start_time.timestamp())
            finishes.append(result.finish_time.timestamp())
    return summarise(starts, finishes)


# --- SAQ -----------------------------------------------------------------------------


async def saq_enqueue(url: str, jobs: int, job: str) -> int:
    from saq import Queue

    queue = Queue.from_url(url, name=QUEUE_NAME)
    try:
        calls = [(lambda job_id=job_id: queue.enqueue(job, key=job_id)) for job_id in job_ids(jobs)]
        done = await in_chunks(calls)
    finally:
        await queue.disconnect()
    return sum(1 for job in done if job is not None)


async def saq_work(url: str, concurrency: int, check_interval: float, job: str) -> None:
    from saq import Queue, Worker

    queue = Queue.from_url(url, name=QUEUE_NAME)
    worker = Worker(queue, functions=[(job, JOBS[job])], concurrency=concurrency)

    async def stop_when_drained() -> None:
        # SAQ's burst mode can cancel a job it has just dequeued when it stops, so the
        # worker is stopped from outside once nothing is left incomplete instead.
        for _ in range(math.ceil(MAX_RUN_SECONDS / check_interval)):
            if await queue.count("incomplete") == 0:
                break
            await asyncio.sleep(check_interval)
        worker.event.set()

    watcher = asyncio.create_task(stop_when_drained())
    try:
        await worker.start()
    finally:
        watcher.cancel()
        await queue.disconnect()


async def saq_stats(url: str, jobs: int) -> dict[str, Any]:
    from saq import Queue, Status

    queue = Queue.from_url(url, name=QUEUE_NAME)
    try:
        found = await queue.jobs(job_ids(jobs))
    finally:
        await queue.disconnect()
    starts: list[float] = []
    finishes: list[float] = []
    for job in found:
        if job is not None and job.status == Status.COMPLETE:
            starts.append(job.started / 1000)
            finishes.append(job.completed / 1000)
    return summarise(starts, finishes)


# --- shared --------------------------------------------------------------------------


def summarise(starts: list[float], finishes: list[float]) -> dict[str, Any]:
    if not starts:
        return {"completed": 0, "first_start": None, "last_finish": None}
    return {"completed": len(starts), "first_start": min(starts), "last_finish": max(finishes)}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["enqueue", "work", "stats"])
    parser.add_argument("system", choices=["arq", "saq"])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--job", choices=sorted(JOBS), default="noop")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=0.05,
        help="arq's poll_delay (it caps how often arq reads its queue; the default 0.5 s is slower"
        " than this), and how often SAQ's run checks whether its queue is drained",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    started = time.time()
    output: dict[str, Any] = {"system": args.system, "action": args.action}
    if args.action == "enqueue":
        enqueue = arq_enqueue if args.system == "arq" else saq_enqueue
        output["enqueued"] = asyncio.run(enqueue(args.redis_url, args.jobs, args.job))
    elif args.action == "work":
        if args.system == "arq":
            asyncio.run(
                arq_work(args.redis_url, args.jobs, args.concurrency, args.idle_wait, args.job)
            )
        else:
            asyncio.run(saq_work(args.redis_url, args.concurrency, args.idle_wait, args.job))
    else:
        stats = arq_stats if args.system == "arq" else saq_stats
        output.update(asyncio.run(stats(args.redis_url, args.jobs)))
    output["seconds"] = time.time() - started
    print(json.dumps(output), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
