"""`python -m fastapi_redis_mini.worker`: consume the task stream until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading

import uvicorn
import uvloop

from ..core.handlers import AnyTaskHandler, resolve_handler
from ..core.redis import RedisTaskQueue, connect, exit_unless_durable_acks
from ..core.runtime import tune_gc
from ..core.settings import Settings, load_settings_or_exit
from ..core.telemetry.logging import configure_logging
from ..core.telemetry.tracing import configure_tracing, shutdown_tracing
from ._batch import batch_options
from ._http import build_app, http_server
from ._sidecar import Sidecar
from ._telemetry import flush_lines
from .runner import Worker, WorkerFailed

log = logging.getLogger("fastapi_redis_mini.worker")


async def _serve_http(server: uvicorn.Server) -> None:
    # uvicorn leaves with SystemExit when it cannot bind; serve() reports that as one line.
    with contextlib.suppress(SystemExit):
        await server.serve()


async def serve(settings: Settings, handler: AnyTaskHandler) -> None:
    tracing = configure_tracing(settings, "fastapi-redis-mini-worker")
    queue = RedisTaskQueue(connect(settings), settings)
    # Keep-alive, the loop's watchdog and the HTTP side run on a thread of their own, with a
    # Redis connection of their own, so a handler that blocks this loop cannot stop them.
    sidecar = Sidecar(lambda: RedisTaskQueue(connect(settings), settings))
    sidecar.start()
    worker = Worker(queue, handler, settings, tracing=tracing, sidecar=sidecar)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    app = build_app(worker, sidecar.queue, settings)
    server = http_server(app, settings.host, settings.metrics_port)
    http = sidecar.run(_serve_http(server))

    def http_ended(_: asyncio.Future[None]) -> None:
        # Without its HTTP side nobody can probe or scrape the worker: losing it is a failure.
        if not server.should_exit:
            worker.fail("the HTTP server (/healthz, /metrics) ended")

    http.add_done_callback(http_ended)
    # A worker nobody can probe or scrape must not run: wait for the port before consuming.
    for _ in range(200):
        if server.started or http.done():
            break
        await asyncio.sleep(0.05)
    if not server.started:
        server.should_exit = True
        await queue.close()
        sidecar.close()
        raise SystemExit(
            f"fastapi-redis-mini: cannot serve /metrics on {settings.host}:{settings.metrics_port}"
            " (METRICS_PORT)"
        )
    try:
        await worker.run()
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(http, 5.0)
        await queue.close()
        sidecar.close()
        shutdown_tracing()


def main() -> None:
    settings = load_settings_or_exit()
    configure_logging(settings.log_format, settings.log_level, "worker")
    exit_unless_durable_acks(settings)
    try:
        handler = resolve_handler(settings.task_handler, settings.max_task_duration)
        batch_options(handler, settings.task_handler)
    except (LookupError, ValueError) as error:
        raise SystemExit(f"fastapi-redis-mini: invalid configuration: {error}") from None
    tune_gc()
    try:
        uvloop.run(serve(settings, handler))
    except WorkerFailed as error:
        # The traceback is logged where the loop ended; Kubernetes restarts the container.
        _exit_past_stuck_handler_threads(1)
        raise SystemExit(f"fastapi-redis-mini: worker failed: {error}") from None
    _exit_past_stuck_handler_threads(0)


def _exit_past_stuck_handler_threads(code: int) -> None:
    """A synchronous handler call the worker gave up on may never return, and Python waits
    for every pool thread at exit: leave without waiting, the outcomes are written."""
    stuck = [t for t in threading.enumerate() if t.name.startswith("handler") and t.is_alive()]
    if stuck:
        log.warning("exiting past %d handler threads still running", len(stuck))
        flush_lines()  # os._exit skips atexit, where the last runs' lines would be logged
        logging.shutdown()
        os._exit(code)


if __name__ == "__main__":
    main()
