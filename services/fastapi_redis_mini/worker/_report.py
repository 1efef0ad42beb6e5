"""What a running handler reports: the TaskContext the worker hands it, one per task.

A handler calls `progress()` and `emit()` from the worker's event loop (async) or from a
thread of the pool (sync, or a batched handler's call). Neither waits for Redis: the report
joins the task's pending list, and one send per task is in flight at a time, carrying all
that piled up meanwhile (consecutive outputs joined into one chunk, consecutive progress
reports reduced to the last). So a handler that emits a token at a time costs one Redis call
per round trip, not one per token, and nothing is timed.

Before the worker writes a task's outcome it waits for the task's reports to be sent
(`close`), so an event stream sees every report before the final status. A report that
cannot be stored (Redis down, the run taken over) is dropped and logged: progress is worth
less than the task, which never fails because of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Sequence

from ..core.queue import QueueUnavailable, Report

log = logging.getLogger(__name__)

Send = Callable[[str, Sequence[Report]], Awaitable[bool]]

# A progress message is for humans: a line, not a document.
MAX_MESSAGE_CHARS = 1000


def merged(reports: Sequence[Report]) -> list[Report]:
    """Consecutive outputs joined into one, consecutive progress reports reduced to the last."""
    out: list[Report] = []
    for report in reports:
        if out and out[-1].kind == report.kind:
            if report.kind == "output":
                report = Report("output", out[-1].text + report.text)
            out[-1] = report
        else:
            out.append(report)
    return out


class TaskReports:
    """The TaskContext of one run: buffers its reports and sends them in the background.

    Every task of a handler that takes a context gets one, most of them never used: making
    one costs a few attribute writes, and the lock is one per worker (held for a list swap).
    """

    __slots__ = ("_closed", "_lock", "_loop", "_pending", "_scheduled", "_send", "_sending",
                 "dropped", "task_id")  # fmt: skip

    def __init__(
        self,
        task_id: str,
        send: Send,
        loop: asyncio.AbstractEventLoop,
        lock: threading.Lock | None = None,
    ) -> None:
        self.task_id = task_id
        self._send = send
        self._loop = loop
        # The pending list is shared with the pool's threads.
        self._lock = lock or threading.Lock()
        self._pending: list[Report] = []
        self._scheduled = False  # a send is in flight or about to start
        self._closed = False
        self._sending: asyncio.Task[None] | None = None
        self.dropped = 0

    @property
    def used(self) -> bool:
        """Whether the handler reported anything (only then has close() anything to do)."""
        return self._scheduled or self._sending is not None

    def progress(self, fraction: float, message: str = "") -> None:
        if not isinstance(fraction, int | float) or not math.isfinite(fraction):
            raise ValueError(f"progress must be a number from 0 to 1, not {fraction!r}")
        if not 0 <= fraction <= 1:
            raise ValueError(f"progress must be from 0 to 1, not {fraction!r}")
        self._add(Report("progress", str(message)[:MAX_MESSAGE_CHARS], float(fraction)))

    def emit(self, chunk: str) -> None:
        if not isinstance(chunk, str):
            raise TypeError(f"emit takes a str, not {type(chunk).__name__}")
        if chunk:
            self._add(Report("output", chunk))

    def _add(self, report: Report) -> None:
        with self._lock:
            if self._closed:
                return  # the run has ended: its outcome is (being) written
            self._pending.append(report)
            if self._scheduled:
                return
            self._scheduled = True
        if asyncio._get_running_loop() is self._loop:
            self._start_sending()
        else:
            self._loop.call_soon_threadsafe(self._start_sending)

    def _start_sending(self) -> None:
        self._sending = asyncio.create_task(self._send_pending(), name="reports")

    async def _send_pending(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._scheduled = False
                    return
            try:
                stored = await self._send(self.task_id, merged(batch))
            except QueueUnavailable as error:
                stored = False
                log.warning("reports dropped: %s", error, extra={"task_id": self.task_id})
            except Exception:
                stored = False
                log.exception("reports dropped", extra={"task_id": self.task_id})
            if not stored:
                self.dropped += len(batch)

    def close_unused(self) -> None:
        """Take no more reports, when none came: a handler still running (abandoned) drops
        whatever it reports later."""
        self._closed = True

    async def close(self, within: float) -> None:
        """Take no more reports, and wait up to `within` seconds for those pending to be sent."""
        with self._lock:
            self._closed = True
        # A thread's last report may still be on its way to the loop: let it land first.
        await asyncio.sleep(0)
        sending = self._sending
        if sending is not None and not sending.done():
            _, still = await asyncio.wait([sending], timeout=within)
            if still:
                extra = {"task_id": self.task_id}
                log.warning("reports still unsent after %gs", within, extra=extra)


class _NoReports:
    """The context of a handler that takes none: never called."""

    def progress(self, fraction: float, message: str = "") -> None:
        pass

    def emit(self, chunk: str) -> None:
        pass


NO_REPORTS = _NoReports()
