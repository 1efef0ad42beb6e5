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

    There is no timer and no size to wait for. The first call starts a batch at once; the calls
    that arrive while that batch is in flight make up the next one, and so on. An idle process
    therefore adds no latency, and a busy one makes one round trip per batch instead of one per
    call, with each batch as large as the load makes it (up to `max_batch`).

    `run` gets the items in arrival order and must return one result per item, in that order.
    If it raises, every call in the batch raises the same error. A call cancelled before its
    batch is sent is left out of it.
    """

    def __init__(
        self, run: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *, max_batch: int = 256
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self._sender is not None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="coalescer")
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
            for _, future in (*batch, *self._waiting):
                future.cancel()
            self._waiting.clear()
            self._sender = None

    async def close(self) -> None:
        """Let the batch in flight finish, up to CLOSE_GRACE seconds, then cancel what is left."""
        sender = self._sender
        if sender is None:
            return
        _, pending = await asyncio.wait([sender], timeout=CLOSE_GRACE)
        for task in pending:
            task.cancel()
            await asyncio.wait([task], timeout=1)
