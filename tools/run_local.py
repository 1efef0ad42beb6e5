"""`make run`: the whole service in the foreground, on an embedded Valkey unless REDIS_URL is set.

Starts the Redis-compatible server (on VALKEY_PORT, default a free port, so that a second
`make run` with its own PORT or a Redis already on 6379 is no obstacle), the api (on PORT,
default 8000) and one worker through the harness, prints the URLs once both answer, and stops
everything cleanly on Ctrl-C. The services log to this terminal.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.processes import (
    API_MODULE,
    WORKER_MODULE,
    Process,
    stop_together,
)
from fastapi_redis_mini_harness.redis_server import RedisServer


def main() -> int:
    env = dict(os.environ)
    env.setdefault("LOG_FORMAT", "text")
    env.setdefault("HOST", "127.0.0.1")
    env.setdefault("WEB_CONCURRENCY", "2")
    port = int(env.setdefault("PORT", "8000"))
    metrics_port = int(env.setdefault("METRICS_PORT", "9100"))
    api_metrics_port = int(env.setdefault("API_METRICS_PORT", "9101"))
    # On a developer's machine the docs are wanted; the chart leaves them off.
    env.setdefault("DOCS_ENABLED", "true")
    server: RedisServer | None = None
    if not env.get("REDIS_URL"):
        valkey_port = env.get("VALKEY_PORT")
        # Never one of the service's own ports, which are not bound yet: a pick of a port
        # that is free now could otherwise be METRICS_PORT (seen in the suite).
        chosen = (
            int(valkey_port)
            if valkey_port
            else free_port(avoid={port, metrics_port, api_metrics_port})
        )
        server = RedisServer(port=chosen, kind="valkey")
        server.start()
        env["REDIS_URL"] = server.url
        print(f"embedded valkey on {server.url}", flush=True)

    services: list[Process] = []
    stopping = False

    def stop(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    try:
        api = Process(
            "api", [sys.executable, "-m", API_MODULE], env, port=port, metrics_port=api_metrics_port
        )
        services.append(api)
        worker = Process("worker", [sys.executable, "-m", WORKER_MODULE], env, port=metrics_port)
        services.append(worker)
        try:
            api.wait_until_answers("/readyz")
            worker.wait_until_answers("/healthz")
        except (AssertionError, RuntimeError) as error:  # the harness's bounded wait ran out
            print(f"the service did not start: {error}", flush=True)
            return 1
        print(
            f"\n  api docs       {api.base_url}/docs"
            f"\n  api metrics    {api.metrics_url}"
            f"\n  worker metrics {worker.metrics_url}"
            "\n  Ctrl-C stops everything\n",
            flush=True,
        )
        while not stopping:
            for service in services:
                if not service.alive():
                    print(
                        f"{service.name} exited with {service.process.returncode}; stopping",
                        flush=True,
                    )
                    exit_code = 1
                    stopping = True
            time.sleep(0.2)
    finally:
        try:
            stop_together(services)
        finally:
            if server is not None:
                server.close()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
