"""The HTTP server's own bounds: gunicorn's `limit_request_*` settings never reach a uvicorn
worker, and uvicorn's httptools protocol accepts any number of headers of any size, and waits
for a slow client forever.

`BoundedWorker` is the gunicorn worker class the api runs. Its protocol answers, per request:
- 431 when the header section passes MAX_HEADER_BYTES or MAX_HEADERS lines; the bytes of an
  unfinished section are counted as they arrive, so it never holds more than MAX_HEADER_BYTES;
- 408 and a close when the header section takes longer than HEADER_TIMEOUT from the first
  byte (or from the connection, for a client that sends nothing), or the body takes longer
  than BODY_TIMEOUT, however it trickles in (found within a quarter second of the deadline);
and closes connections past MAX_CONNECTIONS per process at once. The body's own size is
bounded by MAX_BODY_BYTES in `_middleware.EdgeMiddleware`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]

from ..core.settings import Settings, get_settings

log = logging.getLogger(__name__)


class _Refused(Exception):  # noqa: N818 - a signal from a parser callback, never seen outside
    pass


def _answer(status: bytes, message: str) -> bytes:
    body = b'{"error":{"code":"%s","message":"%s"}}' % (
        status.split(b" ", 1)[1].lower().replace(b" ", b"_"),
        message.encode(),
    )
    return b"".join(
        [
            b"HTTP/1.1 ",
            status,
            b"\r\ncontent-type: application/json\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        ]
    )


# What a connection is waiting for, if anything, against its deadline.
_HEADERS = 1
_BODY = 2


def _sweep_period(settings: Settings) -> float:
    """How often a process looks for connections past their deadline: a quarter of the
    shorter timeout, at most a quarter second, so a timeout fires at most that late."""
    return min(0.25, min(settings.header_timeout, settings.body_timeout) / 4)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on header size and count, and timeouts.

    A request costs no timer: each connection keeps the deadline of what it waits for (its
    header section or its body), and one periodic sweep per process answers or closes the
    connections past theirs. Two timers armed and cancelled per request cost the submit path
    more than the rest of this class. The header bounds are checked once the section is
    complete, and counted exactly only when the bytes it came in could pass MAX_HEADER_BYTES;
    a section that never completes is bounded by the bytes read (`data_received`).
    """

    settings: Settings  # set on the subclass the worker makes, before any connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._unparsed = 0
        self._feeding = 0
        self._completed = 0
        self._waiting = 0  # _HEADERS, _BODY or 0
        self._deadline = 0.0
        self._refusal: bytes | None = None

    # The connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections:
            log.warning("closing a connection: MAX_CONNECTIONS=%s", self.settings.max_connections)
            transport.close()
            return
        _ensure_sweeping(self)
        # A client that connects and sends nothing is a slow header section too.
        self._wait(_HEADERS, self.settings.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting = 0
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        completed = self._completed
        self._feeding = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self._refusal is None:
                raise
            self._refuse(self._refusal)
            return
        except httptools.HttpParserError:
            self._refuse(_answer(b"400 Bad Request", "not a valid HTTP request"))
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_headers and completed == self._completed and self.parser is not None:
            # What the parser holds of an unfinished header section (a header line it has not
            # finished) is bounded here: one read (up to 256 KiB) past MAX_HEADER_BYTES at most.
            self._unparsed += len(data)
            if self._unparsed > self.settings.max_header_bytes:
                self._refuse(self._too_large("MAX_HEADER_BYTES"))

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        if not self._waiting:
            self._wait(_HEADERS, self.settings.header_timeout)

    def on_headers_complete(self) -> None:
        settings = self.settings
        if len(self.headers) > settings.max_headers:
            self._refusal = self._too_large("MAX_HEADERS", "header lines")
            raise _Refused
        # The section came in this read and the unfinished ones before it, so it is no longer
        # than they are; only when they are longer than the limit is it counted.
        if self._unparsed + self._feeding > settings.max_header_bytes:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > settings.max_header_bytes:
                self._refusal = self._too_large("MAX_HEADER_BYTES")
                raise _Refused
        self._in_headers = False
        self._unparsed = 0
        # A request without a body completes at once, in the same read, and stops waiting.
        self._wait(_BODY, settings.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._waiting = 0
        self._completed += 1
        self._in_headers = True
        self._unparsed = 0
        super().on_message_complete()

    # The bounds

    def _too_large(self, setting: str, what: str = "bytes") -> bytes:
        limit = getattr(self.settings, setting.lower())
        return _answer(
            b"431 Request Header Fields Too Large",
            f"request header section over {limit} {what} ({setting})",
        )

    def _wait(self, what: int, seconds: float) -> None:
        self._waiting = what
        self._deadline = self.loop.time() + seconds

    def expire(self, now: float) -> None:
        """Called by the sweep: act on a deadline that has passed."""
        if not self._waiting or now < self._deadline:
            return
        waiting, self._waiting = self._waiting, 0
        if waiting == _HEADERS:
            self._headers_too_slow()
        else:
            self._body_too_slow()

    def _headers_too_slow(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            message = f"request headers took over {self.settings.header_timeout:g} s"
            self._refuse(_answer(b"408 Request Timeout", message + " (HEADER_TIMEOUT)"))

    def _body_too_slow(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.more_body:
            return
        message = f"request body took over {self.settings.body_timeout:g} s (BODY_TIMEOUT)"
        # The app, still waiting for the body, reads a disconnect and sends nothing more.
        response_started = cycle.response_started
        cycle.disconnected = True
        cycle.message_event.set()
        if response_started:
            self.transport.close()
        else:
            self._refuse(_answer(b"408 Request Timeout", message))

    def _refuse(self, response: bytes) -> None:
        self._waiting = 0
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


_SWEPT: weakref.WeakSet[ServerState] = weakref.WeakSet()


def _ensure_sweeping(protocol: BoundedHttpToolsProtocol) -> None:
    """Start the process's sweep over its server's connections, once per server."""
    state = protocol.server_state
    if state in _SWEPT:
        return
    _SWEPT.add(state)
    loop, connections = protocol.loop, protocol.connections
    period = _sweep_period(protocol.settings)

    def sweep() -> None:
        now = loop.time()
        for connection in list(connections):
            if isinstance(connection, BoundedHttpToolsProtocol):
                connection.expire(now)
        loop.call_later(period, sweep)

    loop.call_later(period, sweep)


class BoundedWorker(UvicornWorker):  # type: ignore[misc]
    """The gunicorn worker class of the api: uvicorn with `BoundedHttpToolsProtocol`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Read after the fork, in the worker process, as the app reads them.
        protocol = type("Protocol", (BoundedHttpToolsProtocol,), {"settings": get_settings()})
        self.CONFIG_KWARGS = {"loop": "auto", "http": protocol}
        super().__init__(*args, **kwargs)
