"""Probes and metrics: /healthz, /readyz, /metrics. These stay open when API_KEYS is set."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from ...core.queue import QueueUnavailable
from ...core.telemetry import metrics
from ..deps import operation_id
from ..errors import UNAVAILABLE
from ..state import api_state

router = APIRouter(tags=["operations"], generate_unique_id_function=operation_id)
log = logging.getLogger(__name__)


class Health(BaseModel):
    """A probe's answer: "ok", or what keeps the api from being ready."""

    status: str


class HealthDetail(Health):
    """Liveness, with Redis's state: "ok", or each partition's error code while it cannot
    take writes (the api answers 503 with that code meanwhile, and stays ready)."""

    redis: str | None = None
    partitions: dict[str, str] | None = None


@router.get("/healthz", response_model=HealthDetail, response_model_exclude_none=True)
async def healthz(request: Request, detail: bool = False) -> HealthDetail:
    """Liveness: the process is up and serving. `?detail=true` adds Redis's state."""
    if not detail:
        return HealthDetail(status="ok")
    states = await api_state(request).queue.writable_partitions()
    codes = {str(i): UNAVAILABLE[state][0] for i, state in enumerate(states) if state is not None}
    if not codes:
        return HealthDetail(status="ok", redis="ok")
    redis = next(iter(codes.values())) if len(codes) == len(states) else "partitions_unavailable"
    return HealthDetail(status="ok", redis=redis, partitions=codes if len(states) > 1 else None)


@router.get("/readyz")
async def readyz() -> Health:
    """Readiness: the process serves requests. Redis is not asked: while it cannot take
    writes the api answers 503 itself, with Retry-After, which a client can act on."""
    return Health(status="ok")


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics of every api process, plus the queue's depth read from Redis."""
    state = api_state(request)
    stats = None
    try:
        stats = await state.queue.stats()
    except QueueUnavailable:
        metrics.redis_errors.labels("metrics").inc()
    collector = metrics.QueueStateCollector(stats)
    body, content_type = metrics.render(state.settings.prometheus_multiproc_dir, collector)
    return Response(body, media_type=content_type)
