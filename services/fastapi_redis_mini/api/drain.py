"""Leaving a Service without failing a request.

When Kubernetes starts to stop an api pod, it takes the pod out of the Service's endpoints
and runs the preStop hook, `python -m fastapi_redis_mini.api.drain SECONDS`. The hook leaves
a marker file in the pod's /tmp and waits. From then on every response carries
`Connection: close`, so each client's next request opens a new connection, which the
Service sends to another pod. When SIGTERM comes after the pause, gunicorn stops accepting
and answers what is still in flight, for up to DRAIN_TIMEOUT seconds.

Without the marker, SIGTERM would close idle keep-alive connections at once, and a client
that was writing its next request on one at that moment would see the connection drop.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

_MARKER = "fastapi-redis-mini-leaving"
# How stale the middleware's view of the marker may be: a stat every quarter second, not one
# per request. The preStop pause is seconds long, so a quarter second is plenty.
_RECHECK_SECONDS = 0.25


def marker_path() -> Path:
    """The marker's path: the pod's /tmp, which the hook and every gunicorn worker share."""
    return Path(tempfile.gettempdir()) / _MARKER


class Drain:
    """Whether the pod is leaving: the marker, looked at no more than every quarter second.

    `_middleware.EdgeMiddleware` asks it when each answer starts, so a long-poll begun
    before the hook closes its connection too.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        self._leaving = False
        self._checked_at = float("-inf")

    def leaving(self) -> bool:
        if not self._leaving:
            now = time.monotonic()
            if now - self._checked_at >= _RECHECK_SECONDS:
                self._checked_at = now
                self._leaving = self.marker.exists()
        return self._leaving


def main(argv: list[str]) -> int:
    """The preStop hook: mark the pod as leaving, then wait SECONDS while endpoints update."""
    try:
        (text,) = argv
        seconds = float(text)
        if not 0 <= seconds <= 3600:
            raise ValueError
    except ValueError:
        print("usage: python -m fastapi_redis_mini.api.drain SECONDS (0 to 3600)", file=sys.stderr)
        return 2
    marker_path().touch()
    time.sleep(seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
