"""A thread with its own event loop and its own Redis connection, beside the worker's loop.

What must keep running while a handler holds the worker's loop lives here: keeping held
entries fresh (so no other worker reclaims a task that is still running), the watchdog that
notices a blocked loop, and the HTTP side (/healthz, /readyz, /metrics). An async handler
that makes a blocking call stalls everything on the loop it runs on, but not this thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..core.queue import TaskQueue

log = logging.getLogger(__name__)

T = TypeVar("T")

_START_TIMEOUT = 10.0


class Sidecar:
    """Runs coroutines on a daemon thread's event loop, with a TaskQueue of that loop's own."""

    def __init__(self, make_queue: Callable[[], TaskQueue]) -> None:
        self._make_queue = make_queue
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: TaskQueue | None = None
        self._stop: asyncio.Event | None = None
        # A daemon: a thread stuck in a Redis call must not keep a finished worker alive.
        self._thread = threading.Thread(target=self._main, name="sidecar", daemon=True)

    @property
    def queue(self) -> TaskQueue:
        """The sidecar's own queue client; use it only in coroutines given to run()."""
        if self._queue is None:
            raise RuntimeError("the sidecar has not started")
        return self._queue

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT):
            raise RuntimeError(f"the sidecar thread did not start within {_START_TIMEOUT:g}s")

    def run(self, body: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run `body` on the sidecar's loop; the answer is a future of the caller's loop."""
        if self._loop is None:
            raise RuntimeError("the sidecar has not started")
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(body, self._loop))

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs there, close its queue and end the thread, within `timeout`."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._queue = self._make_queue()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            current = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not current]
            for task in others:
                task.cancel()
            if others:
                await asyncio.wait(others, timeout=1)
            close = getattr(self._queue, "close", None)
            if close is not None:
                try:
                    await asyncio.wait_for(close(), 1)
                except Exception as error:  # best effort: the process is ending
                    log.debug("sidecar queue close failed: %s", error)
