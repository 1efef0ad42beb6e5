"""The client follows a task's events: the stream, its resumption, run's on_progress."""

from __future__ import annotations

import base64
import time

import pytest

from fastapi_redis_mini_client import (
    TaskEvent,
    TaskNotFoundError,
    WaitTimeoutError,
    WebhookVerificationError,
    verify_webhook,
)
from fastapi_redis_mini_client.webhooks import sign

from ._faults import StreamCuttingProxy
from .conftest import BlockingClient, Connect, Stack

pytestmark = pytest.mark.slow

WORDS = "the client follows every word of this prompt"


def output_of(events: list[TaskEvent]) -> str:
    return "".join(str(e.data["chunk"]) for e in events if e.kind == "output")


def test_events_come_in_order_and_end_with_the_final_one(client: BlockingClient) -> None:
    task = client.submit(f"{WORDS} {time.time()}", {"duration": 0.8})
    events = list(client.events(task.task_id, timeout=20))
    assert events[0].kind == "status"
    final = events[-1].task
    assert final is not None
    assert final.status == "DONE"
    assert output_of(events) == final.result["output"]
    assert [e.kind for e in events].count("done") == 1


def test_a_cut_stream_is_resumed_without_loss_or_repeats(connect: Connect, stack: Stack) -> None:
    port = int(stack.api.base_url.rsplit(":", 1)[1])
    with StreamCuttingProxy(port, drop=2, keep=700) as proxy:
        client = connect(proxy.url)
        task = client.submit(f"{WORDS} {time.time()}", {"duration": 1.5})
        events = list(client.events(task.task_id, timeout=30))
        assert proxy.dropped == 2
    final = events[-1].task
    assert final is not None
    assert output_of(events) == final.result["output"]
    assert len({e.id for e in events}) == len(events)


def test_run_reports_progress_as_it_waits(client: BlockingClient) -> None:
    seen: list[float] = []
    result = client.run(
        f"{WORDS} {time.time()}",
        {"duration": 0.8},
        timeout=30,
        on_progress=lambda event: seen.append(event.fraction or 0.0),
    )
    assert result["output"]
    assert seen == sorted(seen)
    assert seen[-1] == 1.0


def test_events_of_an_unknown_task_raise_and_a_slow_one_times_out(
    client: BlockingClient,
) -> None:
    with pytest.raises(TaskNotFoundError):
        list(client.events("0" * 32))
    task = client.submit(f"slow {time.time()}", {"duration": 20})
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        list(client.events(task.task_id, timeout=1))
    assert time.monotonic() - started < 5
    client.cancel(task.task_id)


SECRET = "whsec_" + base64.b64encode(b"a secret of 24 bytes....").decode()


def test_verify_webhook_accepts_a_signed_delivery_and_refuses_a_changed_one() -> None:
    body = b'{"type":"task.completed"}'
    now = int(time.time())
    headers = {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(now),
        "Webhook-Signature": sign(SECRET, "msg_1", now, body),
    }
    assert verify_webhook(SECRET, headers, body) == {"type": "task.completed"}
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, headers, body.replace(b"completed", b"failed"))
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, headers, body, now=now + 3600)
    other = "whsec_" + base64.b64encode(b"another secret").decode()
    with pytest.raises(WebhookVerificationError):
        verify_webhook(other, headers, body)
