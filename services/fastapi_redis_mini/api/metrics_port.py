"""GET /metrics on API_METRICS_PORT, never on the public port.

Every tenant's counters are in /metrics, so it is served apart, as the worker's is, where an
Ingress cannot route to it. Each api process listens on the port with SO_REUSEPORT and any of
them answers, since multiprocess mode merges every process's counts. The server reads one
request line and its headers (at most 8 KiB, within 5 s) and answers GET /metrics; anything
else is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from ..core.queue import QueueStats, QueueUnavailable
from ..core.telemetry import metrics
from .state import ApiState

log = logging.getLogger(__name__)
_REQUEST_LIMIT = 8192
_READ_TIMEOUT = 5.0


async def exposition(state: ApiState) -> tuple[bytes, str]:
    """Prometheus metrics of every api process, plus the queue's depth read from Redis."""
    stats: QueueStats | None = None
    try:
        stats = await state.queue.stats()
    except QueueUnavailable:
        metrics.redis_errors.labels("metrics").inc()
    collector = metrics.QueueStateCollector(stats)
    return metrics.render(state.settings.prometheus_multiproc_dir, collector)


async def _answer(
    state: ApiState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
        method, path, *_ = head.split(b" ", 2)
        if method == b"GET" and path.split(b"?", 1)[0] == b"/metrics":
            body, content_type = await exposition(state)
            status = b"200 OK"
        else:
            body, content_type, status = b"not found\n", "text/plain", b"404 Not Found"
        writer.write(
            b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, content_type.encode(), len(body))
        )
        writer.write(body)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        pass
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def served(state: ApiState) -> AsyncIterator[None]:
    """Serve /metrics on API_METRICS_PORT (HOST's address) while the block runs; 0: not at all."""
    settings = state.settings
    if not settings.api_metrics_port:
        yield
        return
    server = await asyncio.start_server(
        lambda reader, writer: _answer(state, reader, writer),
        settings.host,
        settings.api_metrics_port,
        reuse_port=True,
        limit=_REQUEST_LIMIT,
    )
    try:
        yield
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)
