"""The api against the bare app in one process: CPU per request, steady on a noisy machine.

    python -m loadtest.bench.api_ab                 # POST /tasks misses, the collector as shipped
    python -m loadtest.bench.api_ab --endpoint hit  # cache hits
    python -m loadtest.bench.api_ab --endpoint get  # GET /tasks/{id} of a DONE task
    python -m loadtest.bench.api_ab --gc default    # CPython's collector settings, for comparison

Both apps are served from this one process through their ASGI interfaces, without an HTTP
server: the real one (`create_app`, on its own Valkey on a free loopback port) and
`loadtest/bench/bare_app.py`. They take alternating rounds of concurrent requests, and each
round's process CPU time is charged to the app that ran it. Both see the machine at the same
moments, so the difference between them holds to a few µs even while other tenants change
the machine's speed by a third; the wrk benchmark cannot separate the two that finely.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import uvloop
from starlette.types import ASGIApp, Message

from fastapi_redis_mini_harness.processes import workspace

HIT = b'{"prompt": "bench hit", "params": {"duration": 0}}'


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--endpoint", choices=["miss", "hit", "get"], default="miss")
    parser.add_argument("--rounds", type=int, default=300, help="measured rounds per app")
    parser.add_argument("--concurrency", type=int, default=50, help="requests per round")
    parser.add_argument(
        "--quotas",
        choices=["on", "off"],
        default="on",
        help="on: the per-key quotas at limits no run reaches (their cost, every answer a 202)",
    )
    parser.add_argument(
        "--gc",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned: core.runtime.tune_gc() as the api runs it; default: CPython's settings",
    )
    return parser.parse_args(argv)


async def post(app: ASGIApp, body: bytes, path: str = "/tasks") -> int:
    """POST `body` to `path`; an empty body is a GET instead."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST" if body else "GET", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    delivered = False
    status = 0

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def measure(args: argparse.Namespace, redis_url: str) -> None:
    from fastapi_redis_mini.api.app import create_app
    from fastapi_redis_mini.core.runtime import tune_gc
    from fastapi_redis_mini.core.settings import Settings

    from .bare_app import app as bare

    on = args.quotas == "on"
    settings = Settings(
        redis_url=redis_url,
        max_backlog=1_000_000_000,
        submit_rate_per_key=1_000_000.0 if on else 0,
        submit_burst_per_key=1_000_000 if on else 100,
        max_unfinished_per_key=1_000_000_000 if on else 0,
        max_stored_bytes_per_key=10**12 if on else 0,
    )
    ours = create_app(settings)
    apps: dict[str, ASGIApp] = {"bare": bare, "api": ours}
    counter = 0

    def body() -> bytes:
        nonlocal counter
        counter += 1
        if args.endpoint == "get":
            return b""
        if args.endpoint == "hit":
            return HIT
        return b'{"prompt": "ab %d %s", "params": {"duration": 0}}' % (
            counter,
            uuid.uuid4().hex[:8].encode(),
        )

    async with ours.router.lifespan_context(ours), bare.router.lifespan_context(bare):
        path = "/tasks"
        if args.endpoint in ("hit", "get"):
            task_id = await warm_hit(ours, redis_url)
            path = f"/tasks/{task_id}" if args.endpoint == "get" else path
        if args.gc == "tuned":
            tune_gc()
        cpu = dict.fromkeys(apps, 0.0)
        statuses: dict[str, set[int]] = {name: set() for name in apps}
        collections_before = [g["collections"] for g in gc.get_stats()]
        for n in range(args.rounds + 10):  # the first ten rounds warm both apps up
            for name, app in apps.items():
                started = time.process_time()
                answers = await asyncio.gather(
                    *(post(app, body(), path) for _ in range(args.concurrency))
                )
                if n >= 10:
                    cpu[name] += time.process_time() - started
                    statuses[name].update(answers)
        collections = [
            g["collections"] - c for g, c in zip(gc.get_stats(), collections_before, strict=True)
        ]
    requests = args.rounds * args.concurrency
    per = {name: seconds * 1e6 / requests for name, seconds in cpu.items()}
    route = "GET /tasks/{id} (DONE)" if args.endpoint == "get" else f"POST /tasks ({args.endpoint})"
    print(f"{route}, {requests} requests per app, collector {args.gc}")
    print(
        f"  bare app  {per['bare']:7.1f} µs CPU per request   statuses {sorted(statuses['bare'])}"
    )
    print(f"  api       {per['api']:7.1f} µs CPU per request   statuses {sorted(statuses['api'])}")
    extra, ratio = per["api"] - per["bare"], per["bare"] / per["api"]
    print(f"  api extra {extra:7.1f} µs   ratio bare/api {ratio:.2f}")
    print(f"  collections by generation during the rounds: {collections}")


async def warm_hit(app: ASGIApp, redis_url: str) -> str:
    """Queue the hit prompt and finish it by hand, so that it is in the cache; its task id."""
    from fastapi_redis_mini.core.queue import Finish, Outcome
    from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
    from fastapi_redis_mini.core.settings import Settings

    settings = Settings(redis_url=redis_url)
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        await queue.ensure_group()
        await post(app, HIT)
        deliveries = await queue.read("ab", count=10, block_ms=100)
        jobs = await queue.start("ab", deliveries)
        result = b'{"model": "bench", "output": "ok"}'
        await queue.finish("ab", [Finish(job, Outcome.DONE, result=result) for job in jobs])
        return jobs[0].task_id
    finally:
        await queue.close()


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    with workspace() as space:
        redis_server = space.redis()
        uvloop.run(measure(args, redis_server.url))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
