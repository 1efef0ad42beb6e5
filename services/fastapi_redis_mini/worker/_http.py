"""The worker's small HTTP side: /metrics for Prometheus, /healthz and /readyz for probes.

`python -m fastapi_redis_mini.worker` serves it from the sidecar's thread (see _sidecar.py),
so it answers while a handler blocks the worker's loop, and `queue` is the sidecar's own.
"""

from __future__ import annotations

import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.queue import TaskQueue
from ..core.settings import Settings
from ..core.telemetry import metrics
from .runner import Worker

# The consume loop passes its top at least every read block (1 s) or backoff (5 s at most).
_STALL_SECONDS = 30.0


def build_app(worker: Worker, queue: TaskQueue, settings: Settings) -> Starlette:
    async def metrics_endpoint(_: Request) -> Response:
        body, content_type = metrics.render(settings.prometheus_multiproc_dir)
        return Response(body, media_type=content_type)

    async def healthz(request: Request) -> Response:
        if worker.failure is not None:
            return JSONResponse({"status": "failed", "reason": worker.failure}, 503)
        hung = worker.hung()
        if hung is not None:
            return JSONResponse({"status": "hung", "reason": hung}, 503)
        blocked = worker.loop_blocked_for()
        if blocked:
            # A handler holds the loop: that is judged against TASK_TIMEOUT (hung() above),
            # not as a stall of the consume loop.
            return JSONResponse({"status": "blocked", "seconds": round(blocked, 1)})
        stalled = time.monotonic() - worker.last_progress
        if stalled > _STALL_SECONDS:
            return JSONResponse({"status": "stalled", "seconds": round(stalled, 1)}, 503)
        answer: dict[str, object] = {"status": "ok", "in_flight": worker.in_flight}
        if request.query_params.get("detail") == "true":
            # Still 200 whatever Redis says: a restart would not bring Redis back.
            states = await queue.writable_partitions()
            refusing = {str(i): s.value for i, s in enumerate(states) if s is not None}
            answer["redis"] = "ok" if not refusing else "partitions_unavailable"
            if refusing:
                answer["partitions"] = refusing
            answer["refusing_outcomes"] = sorted(worker.refusing_partitions())
        return JSONResponse(answer)

    async def readyz(_: Request) -> Response:
        # The process only: a worker takes no traffic, and one whose Redis is away waits
        # for it and retries (its partitions' state is in /healthz?detail=true and metrics).
        if worker.loading:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/metrics", metrics_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ]
    )


class _QuietServer(uvicorn.Server):
    """Leaves signal handling to the worker, which owns shutdown."""

    def install_signal_handlers(self) -> None:
        return None


def http_server(app: Starlette, host: str, port: int) -> uvicorn.Server:
    # log_config=None keeps uvicorn's lines in the service's own log format.
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", log_config=None
    )
    return _QuietServer(config)
