"""Coalescing concurrent calls into batches, so that a busy process makes fewer round trips."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CLOSE_GRACE = 5.0


class Coalescer(Generic[T, R]):
    """Runs the calls that meet in one process as one call of `run` with all their items.

    There is no timer and no size to wait for. A call that finds fewer than `max_in_flight`
    batches in flight starts a batch at once; the calls that arrive while every slot is taken
    make up the next batch, sent as soon as a slot frees, and so on. An idle process therefore
    adds no latency, two requests at once do not queue behind each other's round trip, and a
    busy process makes one round trip per batch instead of one per call, with each batch as
    large as the load makes it (up to `max_batch`).

    `run` gets the items in arrival order and must return one result per item, in that order.
    If it raises, every call in the batch raises the same error. A call cancelled before its
    batch is sent is left out of it. Batches in flight together may complete in any order.
    """

    def __init__(
        self,
        run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._run = run
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._senders: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        return bool(self._senders)

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        # With calls already waiting, a sender is either about to take them or every slot is
        # busy and the first sender back takes them; only the first waiting call starts one.
        if len(self._waiting) == 1 and len(self._senders) < self._max_in_flight:
            sender = asyncio.create_task(self._send(), name="coalescer")
            self._senders.add(sender)
        return await future

    async def _send(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                taken = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                batch = [(item, future) for item, future in taken if not future.done()]
                if not batch:
                    continue
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                if len(results) != len(batch):
                    mismatch = RuntimeError(
                        f"batch of {len(batch)} items returned {len(results)} results"
                    )
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(mismatch)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                batch = []
        finally:
            # Cancelled (the queue is closing): nobody will answer these calls any more.
            for _, future in batch:
                future.cancel()
            current = asyncio.current_task()
            if current is not None:
                self._senders.discard(current)
            if not self._senders:
                for _, future in self._waiting:
                    future.cancel()
                self._waiting.clear()

    async def close(self) -> None:
        """Let the batch in flight finish, up to CLOSE_GRACE seconds, then cancel what is left."""
        if not self._senders:
            return
        _, pending = await asyncio.wait(list(self._senders), timeout=CLOSE_GRACE)
        for task in pending:
            task.cancel()
            await asyncio.wait([task], timeout=1)
