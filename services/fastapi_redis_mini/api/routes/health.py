"""Probes: /healthz and /readyz. These stay open when API_KEYS is set; /metrics is served on
API_METRICS_PORT instead (api/metrics_port.py)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ...core.queue import QueueUnavailable
from ..deps import operation_id
from ..errors import UNAVAILABLE
from ..state import api_state

router = APIRouter(tags=["operations"], generate_unique_id_function=operation_id)
log = logging.getLogger(__name__)


class Health(BaseModel):
    """A probe's answer: "ok", or what keeps the api from being ready."""

    status: str


@router.get("/healthz")
async def healthz() -> Health:
    """Liveness: the process is up and serving."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "Redis does not accept writes now"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: Redis accepts writes, so a submit can be stored."""
    try:
        await api_state(request).queue.check_writable()
    except QueueUnavailable as error:
        return JSONResponse({"status": UNAVAILABLE[error.state][0]}, status_code=503)
    return JSONResponse({"status": "ok"})
