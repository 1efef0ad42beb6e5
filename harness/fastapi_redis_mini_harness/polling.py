"""The one way to wait for something to become true: poll, bounded in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
What = str | Callable[[], str]


def _failure(timeout: float, what: What) -> AssertionError:
    return AssertionError(f"not within {timeout:g} s: {what() if callable(what) else what}")


def _answered(value: object) -> bool:
    return value is not None and value is not False


def poll(
    probe: Callable[[], T | None], timeout: float, interval: float = 0.1, what: What = ""
) -> T:
    """The first answer of `probe` within `timeout` seconds: a value other than None or False.

    Past the deadline it raises AssertionError with `what` (a callable is asked then, so the
    message can show the last state), so a wait that never ends fails the test that waited.
    `probe` is tried once more at the deadline: a machine that oversleeps the last interval
    still gets its answer.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = time.monotonic() >= deadline
        value = probe()
        if _answered(value):
            return value  # type: ignore[return-value]  # neither None nor False
        if last:
            raise _failure(timeout, what)
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


async def poll_async(
    probe: Callable[[], Awaitable[T | None]],
    within: float,
    interval: float = 0.1,
    what: What = "",
) -> T:
    """poll() for a coroutine probe, sleeping without blocking the event loop."""
    deadline = time.monotonic() + within
    while True:
        last = time.monotonic() >= deadline
        value = await probe()
        if _answered(value):
            return value  # type: ignore[return-value]  # neither None nor False
        if last:
            raise _failure(within, what)
        await asyncio.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def holds_within(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Whether `condition` holds within `timeout` seconds, for a caller with more to say."""
    try:
        poll(condition, timeout, interval)
    except AssertionError:
        return False
    return True
