"""The api's ASGI middleware: the body size limit, request metrics, security headers, drain."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .drain import Drain

# The docs pages run FastAPI's inline start-up script and load their assets from the api
# itself (routes/docs.py); ReDoc starts a worker from a blob.
DOCS_CSP = (
    b"default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src 'self' blob:; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_NO_STORE = (b"cache-control", b"no-store")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_CSP = (b"content-security-policy", DOCS_CSP)
_CLOSE = (b"connection", b"close")


class EdgeMiddleware:
    """The one ASGI layer around the app, for everything a request needs on its way in and out.

    - **Body size:** 413 for a body over MAX_BODY_BYTES, by its Content-Length or as it
      streams in.
    - **Metrics:** every request counted and timed by method, route template (never the raw
      path) and status. Static files (the docs pages' assets) are not counted: a file name is
      no route template, and they would only add series.
    - **Security headers:** every answer carries `X-Content-Type-Options: nosniff`; every
      answer but a static asset `Cache-Control: no-store`, since results and errors are a
      tenant's own; an HTML page a Content-Security-Policy. A page that sets its own (the
      console's) keeps it: a second header of the same name would be enforced too.
    - **Drain:** `Connection: close` on every answer once the pod is leaving (`drain.py`).

    One layer rather than one per concern: each layer is a coroutine and a wrapped `send` on
    every request, and on `POST /tasks` four of them cost about as much as the route's own
    Redis call did.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, drain: Drain) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.drain = drain
        # The labelled series, looked up once per (method, route, status) rather than per request.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = self._headers(scope, message.get("headers", ()))
            await send(message)

        try:
            limited = self._limited(scope, receive)
            if limited is None:
                await self._refuse(send_with_headers)
            else:
                await self.app(scope, limited, send_with_headers)
        finally:
            # A Mount puts the app it hands the request to in the scope as its endpoint.
            if not isinstance(scope.get("endpoint"), StaticFiles):
                route = getattr(scope.get("route"), "path", "unmatched")
                # A route may set a suffix (request.state) to count a kind of request apart.
                route += scope.get("state", {}).get("metrics_route_suffix", "")
                self._record(scope["method"], route, status, started)

    # The body size

    def _limited(self, scope: Scope, receive: Receive) -> Receive | None:
        """`receive` bounded to MAX_BODY_BYTES; None when the Content-Length is already over."""
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_body_bytes:
                    return None
                # The server delivers no more than the Content-Length it accepted.
                return receive
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._message)
            return message

        return limited_receive

    @property
    def _message(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes (MAX_BODY_BYTES)"

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

    # The headers

    def _headers(self, scope: Scope, given: Iterable[tuple[bytes, bytes]]) -> list[Any]:
        headers = list(given)
        nosniff = cache = csp = True
        html = False
        for name, value in headers:
            key = name.lower()
            if key == b"content-type":
                html = value.startswith(b"text/html")
            elif key == b"cache-control":
                cache = False
            elif key == b"x-content-type-options":
                nosniff = False
            elif key == b"content-security-policy":
                csp = False
        if nosniff:
            headers.append(_NOSNIFF)
        if cache and not isinstance(scope.get("endpoint"), StaticFiles):
            headers.append(_NO_STORE)
        if html and csp:
            headers.append(_CSP)
        if self.drain.leaving():
            headers.append(_CLOSE)
        return headers

    # The metrics

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
