"""Many concurrent event streams on one api process: its memory and CPU, and the events it sent.

    python -m loadtest.bench.events_streams [--streams 1000] [--duration 20] [--words 10]

Queues `--streams` tasks with no worker running, opens one GET /tasks/{id}/events per task
from one asyncio client, and reads the api process's RSS before and once every stream is
open. Then it starts a worker that runs every task at once (the simulate handler emits a word
and a progress report per step over `--duration` s), and reads the api's CPU time over the
run and the events the client received. The api runs one uvicorn worker process
(WEB_CONCURRENCY=1), so every figure is that one process's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from fastapi_redis_mini_harness.processes import start_api, start_worker, workspace

from ._measure import rss_kib


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serving_process(master: int) -> int:
    """The one uvicorn worker gunicorn started, which serves every request."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


async def _follow(client: httpx.AsyncClient, task_id: str, opened: asyncio.Event) -> int:
    events = 0
    async with client.stream("GET", f"/tasks/{task_id}/events") as answer:
        answer.raise_for_status()
        opened.set()
        async for line in answer.aiter_lines():
            if line.startswith("event: "):
                events += 1
    return events


async def _run(
    base_url: str, task_ids: Sequence[str], start_worker_now: Callable[[], None]
) -> tuple[int, float]:
    """Open a stream per task, then start the worker; (events received, seconds of the run)."""
    limits = httpx.Limits(max_connections=len(task_ids) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        opened = [asyncio.Event() for _ in task_ids]
        pairs = zip(task_ids, opened, strict=True)
        follows = [asyncio.create_task(_follow(client, t, o)) for t, o in pairs]
        await asyncio.gather(*(o.wait() for o in opened))
        began = time.monotonic()
        await asyncio.to_thread(start_worker_now)
        counts = await asyncio.gather(*follows)
        return sum(counts), time.monotonic() - began


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--words", type=int, default=10)
    args = parser.parse_args(argv)
    with workspace() as space:
        redis_server = space.redis()
        env = {"WEB_CONCURRENCY": "1", "EVENTS_MAX_STREAMS_PER_KEY": "0", "LOG_LEVEL": "WARNING"}
        api = space.own(start_api(redis_server.url, env, log_path=space.log_path("api")))
        serving = _serving_process(api.pid)
        prompt = " ".join(f"w{n}" for n in range(args.words))
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            params = {"duration": args.duration}
            task_ids = [
                client.post("/tasks", json={"prompt": f"{prompt} {n}", "params": params}).json()[
                    "task_id"
                ]
                for n in range(args.streams)
            ]
        rss_before = rss_kib(serving)
        measured: dict[str, float] = {}

        def start_worker_now() -> None:
            measured["rss_open_kib"] = rss_kib(serving)
            measured["cpu_start"] = _cpu_seconds(serving)
            worker_env = {"MAX_CONCURRENCY": str(args.streams), "LOG_LEVEL": "WARNING"}
            space.own(start_worker(redis_server.url, worker_env, log_path=space.log_path("worker")))

        events, seconds = asyncio.run(_run(api.base_url, task_ids, start_worker_now))
        cpu = _cpu_seconds(serving) - measured["cpu_start"]
        report = {
            "streams": args.streams,
            "api_rss_before_mib": rss_before / 1024,
            "api_rss_streams_open_mib": measured["rss_open_kib"] / 1024,
            "kib_per_stream": (measured["rss_open_kib"] - rss_before) / args.streams,
            "api_rss_after_run_mib": rss_kib(serving) / 1024,
            "events": events,
            "run_seconds": seconds,
            "events_per_second": events / seconds,
            "api_cpu_cores": cpu / seconds,
        }
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
