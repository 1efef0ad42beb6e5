"""The HTTP server's own bounds: gunicorn's `limit_request_*` settings never reach a uvicorn
worker, and uvicorn's httptools protocol accepts any number of headers of any size, and waits
for a slow client forever.

`BoundedWorker` is the gunicorn worker class the api runs. Its protocol answers, per request:
- 431 when the header section passes MAX_HEADER_BYTES or MAX_HEADERS lines, counted as the
  bytes arrive, so an unfinished header section never holds more than MAX_HEADER_BYTES;
- 408 and a close when the header section takes longer than HEADER_TIMEOUT from the first
  byte (or from the connection, for a client that sends nothing), or the body takes longer
  than BODY_TIMEOUT, however it trickles in;
and closes connections past MAX_CONNECTIONS per process at once. The body's own size is
bounded by MAX_BODY_BYTES in `_middleware.BodyLimitMiddleware`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
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


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on header size and count, and timeouts."""

    settings: Settings  # set on the subclass the worker makes, before any connection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._unparsed = 0
        self._completed = 0
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: bytes | None = None

    # The connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.settings.max_connections:
            log.warning("closing a connection: MAX_CONNECTIONS=%s", self.settings.max_connections)
            transport.close()
            return
        # A client that connects and sends nothing is a slow header section too.
        self._arm(self.settings.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        completed = self._completed
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
        self._header_bytes = self._header_count = 0
        if self._timer is None:
            self._arm(self.settings.header_timeout, self._headers_too_slow)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.settings.max_headers:
            self._refusal = self._too_large("MAX_HEADERS", "header lines")
            raise _Refused
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._unparsed = 0
        self._disarm()
        super().on_headers_complete()
        # A request without a body completes at once, in the same read, and disarms it.
        self._arm(self.settings.body_timeout, self._body_too_slow)

    def on_message_complete(self) -> None:
        self._disarm()
        self._completed += 1
        self._in_headers = True
        self._unparsed = 0
        super().on_message_complete()

    # The bounds

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.settings.max_header_bytes:
            self._refusal = self._too_large("MAX_HEADER_BYTES")
            raise _Refused

    def _too_large(self, setting: str, what: str = "bytes") -> bytes:
        limit = getattr(self.settings, setting.lower())
        return _answer(
            b"431 Request Header Fields Too Large",
            f"request header section over {limit} {what} ({setting})",
        )

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_too_slow(self) -> None:
        self._timer = None
        if self.cycle is None or self.cycle.response_complete:
            message = f"request headers took over {self.settings.header_timeout:g} s"
            self._refuse(_answer(b"408 Request Timeout", message + " (HEADER_TIMEOUT)"))

    def _body_too_slow(self) -> None:
        self._timer = None
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
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


class BoundedWorker(UvicornWorker):  # type: ignore[misc]
    """The gunicorn worker class of the api: uvicorn with `BoundedHttpToolsProtocol`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Read after the fork, in the worker process, as the app reads them.
        protocol = type("Protocol", (BoundedHttpToolsProtocol,), {"settings": get_settings()})
        self.CONFIG_KWARGS = {"loop": "auto", "http": protocol}
        super().__init__(*args, **kwargs)
