"""A network fault for the retry tests: an answer lost after the api acted on the request."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self

# Every socket operation gives up after this, so no proxy thread outlives a test by more.
IDLE_SECONDS = 10.0


class AnswerDroppingProxy:
    """A TCP proxy to the api that, for its first `drop` connections, passes the request on
    but closes the client's connection when the answer arrives, without passing it back.

    The api has done the work; the client sees a connection closed without an answer, which
    is exactly the case an Idempotency-Key exists for.
    """

    def __init__(self, upstream_port: int, drop: int = 1) -> None:
        self._upstream_port = upstream_port
        self._to_drop = drop
        self._lock = threading.Lock()
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                drop = self.dropped < self._to_drop
                self.dropped += drop
            threading.Thread(target=self._relay, args=(downstream, drop), daemon=True).start()

    def _relay(self, downstream: socket.socket, drop: bool) -> None:
        downstream.settimeout(IDLE_SECONDS)
        try:
            upstream = socket.create_connection(
                ("127.0.0.1", self._upstream_port), timeout=IDLE_SECONDS
            )
        except OSError:
            downstream.close()
            return
        with upstream, downstream:
            requests = threading.Thread(target=_pipe, args=(downstream, upstream), daemon=True)
            requests.start()
            if drop:
                with contextlib.suppress(OSError):
                    upstream.recv(1)  # the answer has begun: the api acted on the request
            else:
                _pipe(upstream, downstream)
            with contextlib.suppress(OSError):
                downstream.shutdown(socket.SHUT_RDWR)


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass


class StreamCuttingProxy(AnswerDroppingProxy):
    """A TCP proxy to the api that, for its first `drop` connections, passes `keep` bytes of
    the answer back and then closes the client's connection: a stream cut in the middle."""

    def __init__(self, upstream_port: int, drop: int = 1, keep: int = 600) -> None:
        super().__init__(upstream_port, drop)
        self._keep = keep

    def _relay(self, downstream: socket.socket, drop: bool) -> None:
        if not drop:
            super()._relay(downstream, drop)
            return
        downstream.settimeout(IDLE_SECONDS)
        try:
            upstream = socket.create_connection(
                ("127.0.0.1", self._upstream_port), timeout=IDLE_SECONDS
            )
        except OSError:
            downstream.close()
            return
        with upstream, downstream:
            threading.Thread(target=_pipe, args=(downstream, upstream), daemon=True).start()
            passed = 0
            with contextlib.suppress(OSError):
                while passed < self._keep and (data := upstream.recv(self._keep - passed)):
                    downstream.sendall(data)
                    passed += len(data)
            with contextlib.suppress(OSError):
                downstream.shutdown(socket.SHUT_RDWR)
