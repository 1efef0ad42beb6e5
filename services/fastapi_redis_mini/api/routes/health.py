"""Probes and metrics: /healthz, /readyz, /metrics. These stay open when API_KEYS is set."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ...core.queue import QueueUnavailable
from ...core.telemetry import metrics
from ..deps import queue_of, settings_of
from ..errors import UNAVAILABLE

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process is up and serving."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis does not accept writes now"}})
async def readyz(request: Request) -> JSONResponse:
    """Readiness: Redis accepts writes, so a submit can be stored."""
    try:
        await queue_of(request).check_writable()
    except QueueUnavailable as error:
        return JSONResponse({"status": UNAVAILABLE[error.state][0]}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics of every api process, plus the queue's depth read from Redis."""
    queue, settings = queue_of(request), settings_of(request)
    stats = None
    try:
        stats = await queue.stats()
    except QueueUnavailable:
        metrics.redis_errors.labels("metrics").inc()
    collector = metrics.QueueStateCollector(stats)
    body, content_type = metrics.render(settings.prometheus_multiproc_dir, collector)
    return Response(body, media_type=content_type)
