"""Batching across tasks: the tasks a worker holds meet in one call of a batched handler.

A handler takes batches when it has a `max_batch_size` attribute (an int, at least 1; with 1
it is still called with lists). Its `__call__(prompts, params)` then gets two lists of equal
length and returns one entry per item, in order: the item's result, or an exception instance
that fails that item alone (a RetryableError retries it). If the call itself raises, every
item of the batch ends with that error.

Each task still awaits its own item, so TASK_TIMEOUT, a cancel and the shutdown grace act per
task, as they do without batching: an item whose task stopped waiting before its batch was
sent is left out of the batch, and one that stops waiting while the batch runs has its result
thrown away. Retries, dead letters and the result cache see one task each, as ever.

At most `max_batches_in_flight` batches run at once (default 1, as on one device that takes
one call at a time; a CPU model in the thread pool can take two, one per core). While fewer
run, a batch is sent as soon as it holds `max_batch_size` items, and never later than
`max_batch_wait_ms` (default 5) after its first item arrived; so the next batch starts filling
the moment the previous one is sent. While that many run, new items wait, and the next batch
goes the moment one returns. A task therefore waits at most `max_batch_wait_ms` for a batch to
fill, plus the time the handler is busy with the batches before it. A batch holds at most
MAX_CONCURRENCY / max_batches_in_flight items (see _handler.py), so the next one can fill while
the others run only when the worker holds more tasks than the batches in flight take.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.handlers import TaskContext
from . import metrics
from ._report import NO_REPORTS

DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_BATCHES_IN_FLIGHT = 1

BatchCall = Callable[..., Awaitable[Sequence[Any]]]


@dataclass(frozen=True)
class BatchOptions:
    """How a batched handler wants its batches: the attributes it declares, checked."""

    max_size: int
    max_wait_ms: float
    max_in_flight: int


def batch_options(handler: object, name: str) -> BatchOptions | None:
    """The handler's batch options when it takes batches; None when it does not.

    Raises ValueError naming the attribute when one is not a sensible number.
    """
    size = getattr(handler, "max_batch_size", None)
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 10000:
        raise ValueError(f"TASK_HANDLER: {name!r} max_batch_size must be an int from 1 to 10000")
    wait = getattr(handler, "max_batch_wait_ms", DEFAULT_BATCH_WAIT_MS)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 60_000:
        raise ValueError(f"TASK_HANDLER: {name!r} max_batch_wait_ms must be from 0 to 60000")
    in_flight = getattr(handler, "max_batches_in_flight", DEFAULT_BATCHES_IN_FLIGHT)
    if isinstance(in_flight, bool) or not isinstance(in_flight, int) or not 1 <= in_flight <= 64:
        raise ValueError(
            f"TASK_HANDLER: {name!r} max_batches_in_flight must be an int from 1 to 64"
        )
    return BatchOptions(size, float(wait), in_flight)


_Item = tuple[str, Mapping[str, Any], "asyncio.Future[Any]", float, TaskContext]


class Batcher:
    """Collects items into batches of at most `size`, at most `in_flight` of them running.

    While fewer than `in_flight` run, a batch goes as soon as it is full, or `wait_ms` after its
    first item. Otherwise new items wait, as they would for a busy device, and the next batch
    (up to `size` of them) goes the moment one returns: under load batches grow by themselves,
    and an idle handler adds at most `wait_ms` to a task.
    """

    def __init__(
        self,
        call: BatchCall,
        size: int,
        wait_ms: float,
        *,
        in_flight: int = DEFAULT_BATCHES_IN_FLIGHT,
        with_contexts: bool = False,
    ) -> None:
        self._call = call
        self._with_contexts = with_contexts  # the handler takes `contexts`, one per item
        self.size = size
        self._wait = wait_ms / 1000
        self._in_flight = in_flight
        self._waiting: list[_Item] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches whose call has not returned

    def __call__(
        self, prompt: str, params: Mapping[str, Any], context: TaskContext = NO_REPORTS
    ) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((prompt, params, future, time.monotonic(), context))
        if len(self._running) >= self._in_flight:
            return future  # the first batch to return sends the next one
        if len(self._waiting) >= self.size:
            self._send()
        elif self._timer is None:
            self._timer = loop.call_later(self._wait, self._on_timer)
        return future

    def _on_timer(self) -> None:
        self._timer = None
        if len(self._running) < self._in_flight:
            self._send()

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            taken = self._waiting[: self.size]
            del self._waiting[: self.size]
            batch = [item for item in taken if not item[2].done()]  # drop stopped tasks
            if batch:
                metrics.batch_size.observe(len(batch))
                metrics.batch_wait.observe(time.monotonic() - batch[0][3])
                running = asyncio.create_task(self._run(batch), name="batch")
                self._running.add(running)
                running.add_done_callback(self._running.discard)
                break
        if self._waiting and len(self._running) < self._in_flight:
            # More than one batch's worth was waiting: the next starts filling now, with
            # its own max_batch_wait_ms, or goes at once if it is full already.
            if len(self._waiting) >= self.size:
                self._send()
            else:
                self._timer = asyncio.get_running_loop().call_later(self._wait, self._on_timer)

    async def _run(self, batch: list[_Item]) -> None:
        try:
            await self._answer(batch)
        finally:
            self._running.discard(asyncio.current_task())  # before the next _send counts
            if self._waiting:
                self._send()

    async def _answer(self, batch: list[_Item]) -> None:
        try:
            arguments = [[p for p, *_ in batch], [item[1] for item in batch]]
            if self._with_contexts:
                arguments.append([item[4] for item in batch])
            results = await self._call(*arguments)
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items returned {len(results)} results")
        except Exception as error:
            for _, _, future, *_ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, _, future, *_), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its task stopped waiting: timed out, cancelled or released
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
