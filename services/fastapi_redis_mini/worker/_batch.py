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

A batch is sent as soon as it holds `max_batch_size` items, and never later than
`max_batch_wait_ms` (default 5) after its first item arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from . import metrics

DEFAULT_BATCH_WAIT_MS = 5.0

BatchCall = Callable[[list[str], list[Mapping[str, Any]]], Awaitable[Sequence[Any]]]


def batch_options(handler: object, name: str) -> tuple[int, float] | None:
    """(max_batch_size, max_batch_wait_ms) when the handler takes batches; None when not.

    Raises ValueError naming the attribute when either is not a sensible number.
    """
    size = getattr(handler, "max_batch_size", None)
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 10000:
        raise ValueError(f"TASK_HANDLER: {name!r} max_batch_size must be an int from 1 to 10000")
    wait = getattr(handler, "max_batch_wait_ms", DEFAULT_BATCH_WAIT_MS)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 60_000:
        raise ValueError(f"TASK_HANDLER: {name!r} max_batch_wait_ms must be from 0 to 60000")
    return size, float(wait)


class Batcher:
    """Collects items into batches of at most `size`, each sent within `wait_ms` of its first."""

    def __init__(self, call: BatchCall, size: int, wait_ms: float) -> None:
        self._call = call
        self._size = size
        self._wait = wait_ms / 1000
        self._waiting: list[tuple[str, Mapping[str, Any], asyncio.Future[Any]]] = []
        self._first_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def __call__(self, prompt: str, params: Mapping[str, Any]) -> Awaitable[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((prompt, params, future))
        if len(self._waiting) >= self._size:
            self._send()
        elif len(self._waiting) == 1:
            self._first_at = time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(self._wait, self._send)
        return future

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waited = time.monotonic() - self._first_at
        taken, self._waiting = self._waiting[: self._size], self._waiting[self._size :]
        if self._waiting:  # more than a batch arrived at once: the rest start a new wait
            self._first_at = time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(self._wait, self._send)
        batch = [item for item in taken if not item[2].done()]  # drop stopped tasks
        if not batch:
            return
        metrics.batch_size.observe(len(batch))
        metrics.batch_wait.observe(waited)
        sender = asyncio.create_task(self._run(batch), name="batch")
        self._sending.add(sender)
        sender.add_done_callback(self._sending.discard)

    async def _run(self, batch: list[tuple[str, Mapping[str, Any], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._call([p for p, _, _ in batch], [q for _, q, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items returned {len(results)} results")
        except Exception as error:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its task stopped waiting: timed out, cancelled or released
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
