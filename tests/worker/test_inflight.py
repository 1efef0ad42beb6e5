"""The decision on a run's outcome, without Redis: how the run ended and why it was stopped."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_redis_mini.core.handlers import RetryableError
from fastapi_redis_mini.core.queue import Finish, Job, Outcome, StartVerdict
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker.inflight import StopReason, decide

SETTINGS = Settings(
    task_timeout=7, max_task_duration=5, max_retries=3, retry_backoff=1.0, retry_backoff_max=3.0
)
NOW = 1000.0


def job(attempts: int = 1) -> Job:
    return Job(entry_id="1-0", task_id="t", verdict=StartVerdict.RUN, attempts=attempts)


def outcome(
    ended: BaseException | None,
    stop: StopReason | None = None,
    *,
    attempts: int = 1,
    jitter: float = 0.0,
) -> Finish | None:
    return decide(
        job(attempts),
        ended,
        b'{"a":1}',
        stop,
        SETTINGS,
        clock=lambda: NOW,
        jitter=lambda: jitter,
    )


def test_a_returned_result_is_done_with_that_result() -> None:
    finish = outcome(None)
    assert finish is not None
    assert (finish.outcome, finish.result) == (Outcome.DONE, b'{"a":1}')


def test_a_result_that_arrives_despite_a_cancel_request_is_still_done() -> None:
    finish = outcome(None, StopReason.CANCELLED)
    assert finish is not None
    assert finish.outcome is Outcome.DONE


@pytest.mark.parametrize("ended", [None, asyncio.CancelledError(), ValueError("x")])
def test_a_run_another_worker_took_over_has_no_outcome_here(ended: BaseException | None) -> None:
    assert outcome(ended, StopReason.LOST) is None


def test_a_run_cancelled_at_the_clients_request_is_cancelled() -> None:
    finish = outcome(asyncio.CancelledError(), StopReason.CANCELLED)
    assert finish is not None
    assert (finish.outcome, finish.error) == (Outcome.CANCELLED, "cancelled while running")


def test_a_run_stopped_past_the_shutdown_grace_is_released_at_once() -> None:
    finish = outcome(asyncio.CancelledError(), StopReason.RELEASED)
    assert finish is not None
    assert (finish.outcome, finish.due_at) == (Outcome.RELEASE, NOW)


def test_a_timeout_fails_naming_the_limit() -> None:
    finish = outcome(TimeoutError())
    assert finish is not None
    assert (finish.outcome, finish.error) == (Outcome.FAILED, "timeout after 7s")


def test_an_error_fails_with_its_type_and_message() -> None:
    finish = outcome(KeyError("prompt"))
    assert finish is not None
    assert (finish.outcome, finish.error) == (Outcome.FAILED, "KeyError: 'prompt'")


@pytest.mark.parametrize(
    ("attempts", "jitter", "delay"),
    [(1, 0.0, 0.5), (1, 0.999, 0.9995), (2, 0.0, 1.0), (3, 0.5, 2.25)],
)
def test_a_retryable_error_is_retried_after_a_capped_jittered_backoff(
    attempts: int, jitter: float, delay: float
) -> None:
    finish = outcome(RetryableError("busy"), attempts=attempts, jitter=jitter)
    assert finish is not None
    assert (finish.outcome, finish.error) == (Outcome.RETRY, "RetryableError: busy")
    assert finish.due_at == pytest.approx(NOW + delay)


def test_a_retryable_error_past_max_retries_fails() -> None:
    finish = outcome(RetryableError("busy"), attempts=4)
    assert finish is not None
    assert (finish.outcome, finish.error) == (
        Outcome.FAILED,
        "gave up after 4 attempts: RetryableError: busy",
    )
