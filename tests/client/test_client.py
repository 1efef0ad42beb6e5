"""Client and AsyncClient against the real api and worker: one suite, run over both."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from anyio.from_thread import start_blocking_portal

from fastapi_redis_mini_client import (
    AsyncClient,
    Client,
    ConflictError,
    IdempotencyKeyReusedError,
    NotFoundError,
    Priority,
    Schedule,
    TaskCancelledError,
    TaskExpiredError,
    TaskFailedError,
    TaskNotFoundError,
    TaskStatus,
    WaitTimeoutError,
)

from .conftest import API_KEY, OTHER_API_KEY, BlockingClient, Connect, Stack

pytestmark = pytest.mark.slow

UNKNOWN_ID = "0" * 32


def unique(text: str) -> str:
    """A prompt no other test sends, so the result cache never answers for another test."""
    return f"{text} {uuid.uuid4().hex}"


def test_submit_queues_a_task_and_wait_returns_it_done(client: BlockingClient) -> None:
    prompt = unique("the quick brown fox")
    submitted = client.submit(prompt, {"duration": 0.3, "model": "m-2"})
    assert submitted.status is TaskStatus.PENDING
    assert submitted.cached is False

    done = client.wait(submitted.task_id, timeout=20)

    assert done.task_id == submitted.task_id
    assert done.status is TaskStatus.DONE
    assert done.result["model"] == "m-2"
    assert done.result["prompt_tokens"] == len(prompt.split())
    assert done.attempts == 1
    assert done.finished_at is not None
    assert done.started_at is not None
    assert done.finished_at >= done.started_at


def test_get_reads_the_current_state(client: BlockingClient) -> None:
    submitted = client.submit(unique("read me"), {"duration": 2})
    task = client.get(submitted.task_id)
    assert task.task_id == submitted.task_id
    assert task.status in {TaskStatus.PENDING, TaskStatus.RUNNING}
    assert task.created_at is not None


def test_an_identical_submit_after_done_is_answered_from_the_cache(
    client: BlockingClient,
) -> None:
    prompt = unique("cache me")
    first = client.wait(client.submit(prompt).task_id, timeout=20)

    again = client.submit(prompt)

    assert again.status is TaskStatus.DONE
    assert again.cached is True
    assert again.result == first.result


def test_the_same_idempotency_key_answers_with_the_first_task(client: BlockingClient) -> None:
    key, prompt = uuid.uuid4().hex, unique("once")
    first = client.submit(prompt, {"duration": 1}, idempotency_key=key)
    second = client.submit(prompt, {"duration": 1}, idempotency_key=key)
    assert second.task_id == first.task_id


def test_a_key_sent_again_with_another_body_is_refused(client: BlockingClient) -> None:
    key = uuid.uuid4().hex
    first = client.submit(f"keyed {key}", {"duration": 0}, idempotency_key=key)
    for prompt, params in ((f"another {key}", {"duration": 0}), (f"keyed {key}", {"x": 1})):
        with pytest.raises(IdempotencyKeyReusedError) as raised:
            client.submit(prompt, params, idempotency_key=key)
        assert (raised.value.status_code, raised.value.code) == (422, "idempotency_key_reused")
        assert first.task_id in raised.value.message
    # The key still answers its own request with its own task.
    assert client.submit(f"keyed {key}", {"duration": 0}, idempotency_key=key).task_id == (
        first.task_id
    )


def test_each_submit_without_a_key_gets_a_fresh_one(client: BlockingClient) -> None:
    # Same body while the first is still pending: single-flight answers with the first task,
    # marked coalesced. A shared generated key would have found it as its key's duplicate,
    # which is not marked.
    prompt = unique("twice")
    first = client.submit(prompt, {"duration": 2})
    second = client.submit(prompt, {"duration": 2})
    assert second.task_id == first.task_id
    assert (first.coalesced, second.coalesced) == (False, True)


def test_run_returns_the_result(client: BlockingClient) -> None:
    result = client.run(unique("run me now"), {"model": "m-3"}, timeout=20)
    assert result["model"] == "m-3"
    assert result["prompt_tokens"] == 4


def test_run_raises_task_failed_with_the_handlers_error(client: BlockingClient) -> None:
    with pytest.raises(TaskFailedError) as raised:
        client.run(unique("fail me"), {"fail": True}, timeout=20)
    task = raised.value.task
    assert task.status is TaskStatus.FAILED
    assert task.error is not None
    assert "simulated failure requested by params.fail" in task.error


def test_run_raises_task_cancelled_when_the_task_is_cancelled(
    connect: Connect, stack: Stack
) -> None:
    runner, other = connect(stack.api.base_url), connect(stack.api.base_url)
    key = uuid.uuid4().hex
    prompt = unique("cancel my run")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(runner.run, prompt, {"duration": 10}, 30, key)
        # The same key finds the task the run submitted (or submits it first: one task either way).
        task_id = other.submit(prompt, {"duration": 10}, idempotency_key=key).task_id
        other.cancel(task_id)
        with pytest.raises(TaskCancelledError) as raised:
            running.result(timeout=30)
    assert raised.value.task.task_id == task_id
    assert raised.value.task.status is TaskStatus.CANCELLED


def test_a_schedule_is_sent_and_read_back(client: BlockingClient) -> None:
    before = time.time()
    task = client.submit(unique("later"), schedule=Schedule(priority=Priority.LOW,
                                                            delay_seconds=30))  # fmt: skip
    read = client.get(task.task_id)
    assert (read.status, read.priority) == (TaskStatus.PENDING, "low")
    assert read.run_at is not None
    assert before + 30 <= read.run_at <= time.time() + 30
    client.cancel(task.task_id)


def test_run_raises_task_expired_when_not_started_by_its_deadline(
    client: BlockingClient,
) -> None:
    # Due in 1 s and given 1 µs from then: a task is handed out no sooner than it is due, and
    # a start is at least one Redis round trip after that, so it can never start in time.
    schedule = Schedule(delay_seconds=1, deadline_seconds=0.000001)
    with pytest.raises(TaskExpiredError) as raised:
        client.run(unique("too late"), timeout=20, schedule=schedule)
    assert raised.value.task.status is TaskStatus.EXPIRED
    assert raised.value.task.started_at is None


def test_wait_raises_a_timeout_with_the_last_state_when_not_final(
    client: BlockingClient,
) -> None:
    task_id = client.submit(unique("slow"), {"duration": 5}).task_id
    began = time.monotonic()
    with pytest.raises(WaitTimeoutError) as raised:
        client.wait(task_id, timeout=1.0)
    waited = time.monotonic() - began
    assert 1.0 <= waited < 4.0
    assert isinstance(raised.value, TimeoutError)
    last = raised.value.task
    assert last is not None
    assert last.task_id == task_id
    assert last.status in {TaskStatus.PENDING, TaskStatus.RUNNING}


def test_wait_with_no_time_left_reads_once(client: BlockingClient) -> None:
    task_id = client.submit(unique("read once")).task_id
    done = client.wait(task_id, timeout=20)
    assert client.wait(task_id, timeout=0) == done
    pending = client.submit(unique("not yet"), {"duration": 5}).task_id
    with pytest.raises(WaitTimeoutError):
        client.wait(pending, timeout=0)


def test_cancel_stops_a_task_and_a_second_cancel_is_a_conflict(client: BlockingClient) -> None:
    task_id = client.submit(unique("cancel me"), {"duration": 10}).task_id

    cancelled = client.cancel(task_id)

    assert cancelled.status is TaskStatus.CANCELLED or cancelled.cancel_requested
    final = client.wait(task_id, timeout=20)
    assert final.status is TaskStatus.CANCELLED
    with pytest.raises(ConflictError) as raised:
        client.cancel(task_id)
    assert "CANCELLED" in raised.value.message


def test_an_unknown_task_is_task_not_found_for_every_read(client: BlockingClient) -> None:
    with pytest.raises(TaskNotFoundError):
        client.get(UNKNOWN_ID)
    with pytest.raises(TaskNotFoundError):
        client.wait(UNKNOWN_ID, timeout=5)
    with pytest.raises(TaskNotFoundError):
        client.cancel(UNKNOWN_ID)


def test_a_task_id_cannot_reach_another_path(client: BlockingClient) -> None:
    # The id is one path segment, escaped: "../healthz" must not read /healthz (which
    # answers 200), only fail to name a task.
    with pytest.raises(NotFoundError):
        client.get("../healthz")


def test_a_task_of_another_api_key_is_not_found(connect: Connect, stack: Stack) -> None:
    owner, stranger = connect(stack.api.base_url), connect(stack.api.base_url, OTHER_API_KEY)
    task_id = owner.submit(unique("mine")).task_id
    assert owner.get(task_id).task_id == task_id
    with pytest.raises(TaskNotFoundError):
        stranger.get(task_id)


def test_wait_outlasts_a_task_longer_than_one_long_poll(stack: Stack) -> None:
    # 31 s: the shortest task one long-poll cannot see finish (the service refuses wait > 30),
    # so a DONE answer proves the wait went on in slices. Client and AsyncClient wait on the
    # same task at once: the 31 s are spent once for both.
    url = stack.api.base_url
    with Client(url, API_KEY) as client, start_blocking_portal() as portal:
        async_client = AsyncClient(url, API_KEY)
        try:
            task_id = client.submit(unique("long"), {"duration": 31}).task_id
            began = time.monotonic()
            with ThreadPoolExecutor(1) as pool:
                by_sync = pool.submit(client.wait, task_id, 60)
                by_async = portal.call(async_client.wait, task_id, 60)
                sync_done = by_sync.result(timeout=70)
            waited = time.monotonic() - began
        finally:
            portal.call(async_client.aclose)
    for done in (sync_done, by_async):
        assert done.status is TaskStatus.DONE
        assert done.finished_at is not None
        assert done.started_at is not None
        assert done.finished_at - done.started_at >= 31.0
    assert waited > 30.0
