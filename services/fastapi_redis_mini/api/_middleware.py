"""ASGI middleware: request metrics, the body size limit and the security headers."""

from __future__ import annotations

import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics


class MetricsMiddleware:
    """Counts and times every request by method, route template (never the raw path) and status.

    Static files (the docs pages' assets) are not counted: a file name is no route template,
    and they would only add series.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # The labelled series, looked up once per (method, route, status) rather than per request.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # A Mount puts the app it hands the request to in the scope as its endpoint.
            if not isinstance(scope.get("endpoint"), StaticFiles):
                route = getattr(scope.get("route"), "path", "unmatched")
                # A route may set a suffix (request.state) to count a kind of request apart.
                route += scope.get("state", {}).get("metrics_route_suffix", "")
                self._record(scope["method"], route, status, started)

    def _record(self, method: str, route: str, status: int, started: float) -> None:
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            labels = (method, route, str(status))
            series = (
                metrics.http_requests.labels(*labels),
                metrics.http_request_duration.labels(*labels),
            )
            self._series[key] = series
        series[0].inc()
        series[1].observe(time.perf_counter() - started)


# The docs pages run FastAPI's inline start-up script and load their assets from the api
# itself (routes/docs.py); ReDoc starts a worker from a blob.
DOCS_CSP = (
    b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src 'self' blob:; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_NO_STORE = (b"cache-control", b"no-store")
_NOSNIFF = (b"x-content-type-options", b"nosniff")


class SecurityHeadersMiddleware:
    """Every answer carries `X-Content-Type-Options: nosniff`; every answer but a static asset
    `Cache-Control: no-store`, since results and errors are a tenant's own; an HTML page a
    Content-Security-Policy."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                # A page that sets its own (the console's) keeps it: a second header of the
                # same name would be enforced too, and the stricter of two CSPs wins.
                present = {name.lower() for name, _ in headers}
                static = isinstance(scope.get("endpoint"), StaticFiles)
                if b"x-content-type-options" not in present:
                    headers.append(_NOSNIFF)
                if not static and b"cache-control" not in present:
                    headers.append(_NO_STORE)
                html = any(n == b"content-type" and v.startswith(b"text/html") for n, v in headers)
                if html and b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", DOCS_CSP))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimitMiddleware:
    """Answers 413 for a body over MAX_BODY_BYTES, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._refuse(send)
                    return
                # The server delivers no more than the Content-Length it accepted.
                await self.app(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message)
            return message

        await self.app(scope, limited_receive, send)

    @property
    def _message(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (MAX_BODY_BYTES)"

    async def _refuse(self, send: Send) -> None:
        body = b'{"error":{"code":"payload_too_large","message":"%s"}}' % self._message.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
