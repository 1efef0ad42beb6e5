"""Coalescer: concurrent calls share one run, in order, and every caller gets its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fastapi_redis_mini.core import batching
from fastapi_redis_mini.core.batching import Coalescer


class Recorder:
    """A batch function that records every batch it is given and answers item * 10."""

    def __init__(self, pause: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.pause = pause
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        await asyncio.sleep(self.pause)
        return [item * 10 for item in items]


async def test_a_lone_call_runs_at_once_as_a_batch_of_one() -> None:
    run = Recorder()
    coalescer = Coalescer(run)
    assert await coalescer(7) == 70
    assert run.batches == [[7]]
    assert not coalescer.busy


async def test_calls_that_meet_share_a_batch_and_keep_their_order() -> None:
    run = Recorder()
    coalescer = Coalescer(run)
    results = await asyncio.gather(*(coalescer(i) for i in range(20)))
    assert results == [i * 10 for i in range(20)]
    assert run.batches == [list(range(20))]


async def test_calls_arriving_while_every_slot_is_busy_make_up_the_next_batch() -> None:
    run = Recorder()
    run.release.clear()
    coalescer = Coalescer(run, max_in_flight=1)
    first = asyncio.ensure_future(coalescer(1))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(coalescer(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert run.batches == [[1]]  # the others wait for the batch in flight
    run.release.set()
    assert await first == 10
    assert [await task for task in later] == [20, 30, 40]
    assert run.batches == [[1], [2, 3, 4]]


async def test_a_second_call_does_not_wait_for_the_first_ones_round_trip() -> None:
    run = Recorder()
    run.release.clear()
    coalescer = Coalescer(run, max_in_flight=2)
    first = asyncio.ensure_future(coalescer(1))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(coalescer(2))
    await asyncio.sleep(0.01)
    assert run.batches == [[1], [2]]  # both in flight at once
    third = [asyncio.ensure_future(coalescer(i)) for i in (3, 4)]
    await asyncio.sleep(0.01)
    assert run.batches == [[1], [2]]  # both slots busy: 3 and 4 wait, together
    run.release.set()
    assert [await first, await second, *[await task for task in third]] == [10, 20, 30, 40]
    assert run.batches == [[1], [2], [3, 4]]
    assert not coalescer.busy


async def test_close_cancels_calls_that_no_batch_will_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batching, "CLOSE_GRACE", 0.05)
    run = Recorder()
    run.release.clear()
    coalescer = Coalescer(run, max_in_flight=1)
    in_flight = asyncio.ensure_future(coalescer(1))
    await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(coalescer(2))
    await asyncio.sleep(0.01)
    await coalescer.close()  # the batch never returns: close gives up after its grace
    assert in_flight.cancelled()
    assert queued.cancelled()
    assert not coalescer.busy


async def test_batches_are_cut_at_max_batch() -> None:
    run = Recorder()
    coalescer = Coalescer(run, max_batch=4)
    results = await asyncio.gather(*(coalescer(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert [len(batch) for batch in run.batches] == [4, 4, 2]


async def test_an_error_reaches_every_call_of_its_batch_and_no_other() -> None:
    calls = 0

    async def flaky(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("redis went away")
        return list(items)

    coalescer = Coalescer(flaky)
    outcomes = await asyncio.gather(*(coalescer(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    assert await coalescer(5) == 5  # the coalescer itself is still usable


async def test_a_wrong_number_of_results_is_an_error_not_a_misdelivery() -> None:
    async def short(items: Sequence[int]) -> list[int]:
        return list(items)[:-1]

    coalescer = Coalescer(short)
    outcomes = await asyncio.gather(*(coalescer(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes), outcomes


async def test_a_call_cancelled_before_its_batch_is_left_out() -> None:
    run = Recorder()
    run.release.clear()
    coalescer = Coalescer(run, max_in_flight=1)
    first = asyncio.ensure_future(coalescer(1))
    await asyncio.sleep(0.01)
    dropped = asyncio.ensure_future(coalescer(2))
    kept = asyncio.ensure_future(coalescer(3))
    await asyncio.sleep(0.01)
    dropped.cancel()
    run.release.set()
    assert (await first, await kept) == (10, 30)
    assert run.batches == [[1], [3]]


async def test_close_waits_for_the_batch_in_flight() -> None:
    run = Recorder(pause=0.05)
    coalescer = Coalescer(run)
    call = asyncio.ensure_future(coalescer(4))
    await asyncio.sleep(0)
    await coalescer.close()
    assert call.done()
    assert await call == 40


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        Coalescer(Recorder(), max_in_flight=0)
