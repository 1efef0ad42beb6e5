"""POST /tasks with scheduling fields: what each answers, and a 422 naming each bad one.
The app runs in-process on a real Redis."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
from pydantic import SecretStr

from .conftest import ClientFactory


async def submit(client: httpx.AsyncClient, body: object, **headers: str) -> httpx.Response:
    return await client.post("/tasks", json=body, headers=headers)


async def test_bad_scheduling_fields_get_422_naming_the_field(
    make_client: ClientFactory,
) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    cases: list[tuple[dict[str, object], str]] = [
        ({"priority": "urgent"}, "priority: "),
        ({"delay_seconds": -1}, "delay_seconds: "),
        ({"delay_seconds": "soon"}, "delay_seconds: "),
        ({"delay_seconds": 7201}, "delay_seconds: more than RESULT_EXPIRY (7200 s)"),
        ({"run_at": past}, "run_at: is in the past"),
        ({"run_at": "2030-01-01T10:00:00"}, "run_at: needs a time zone"),
        ({"run_at": "tomorrow"}, "run_at: "),
        ({"run_at": "2099-01-01T00:00:00Z"}, "run_at: more than RESULT_EXPIRY (7200 s) ahead"),
        ({"delay_seconds": 5, "run_at": "2099-01-01T00:00:00Z"}, "run_at: give delay_seconds"),
        ({"deadline_seconds": 0}, "deadline_seconds: "),
        ({"deadline_seconds": 9000}, "deadline_seconds: more than RESULT_EXPIRY"),
    ]
    async with make_client(worker=False, result_expiry=7200) as client:
        for fields, message in cases:
            response = await submit(client, {"prompt": "x", **fields})
            assert response.status_code == 422, fields
            assert response.json()["error"]["message"].startswith(message), response.json()


async def test_identical_concurrent_submits_answer_one_task_marked_coalesced(
    make_client: ClientFactory,
) -> None:
    async with make_client(worker=False) as client:
        body = {"prompt": "once for all", "params": {"duration": 0}}
        answers = await asyncio.gather(*(submit(client, body) for _ in range(20)))
    assert {answer.status_code for answer in answers} == {202}
    assert len({answer.json()["task_id"] for answer in answers}) == 1
    assert sorted(answer.json()["coalesced"] for answer in answers) == [False] + [True] * 19


async def test_a_request_identical_to_a_failed_one_makes_a_new_task(
    make_client: ClientFactory,
) -> None:
    async with make_client() as client:
        body = {"prompt": "fails", "params": {"fail": True}}
        first = (await submit(client, body)).json()["task_id"]
        failed = (await client.get(f"/tasks/{first}", params={"wait": 10})).json()
        assert failed["status"] == "FAILED"
        again = (await submit(client, body)).json()
    # The failed task is not an answer: no cache entry and no task in flight.
    assert again["task_id"] != first
    assert again["coalesced"] is False


async def test_a_delayed_task_shows_when_it_runs_and_cancels_while_it_waits(
    make_client: ClientFactory,
) -> None:
    async with make_client(worker=False) as client:
        before = time.time()
        answer = (await submit(client, {"prompt": "later", "delay_seconds": 60})).json()
        task = (await client.get(f"/tasks/{answer['task_id']}")).json()
        assert task["status"] == "PENDING"
        assert before + 60 <= task["run_at"] <= time.time() + 60
        at = datetime(2030, 1, 1, 10, tzinfo=UTC)
        scheduled = await submit(client, {"prompt": "at ten", "run_at": at.isoformat()})
        assert scheduled.status_code == 422  # more than RESULT_EXPIRY ahead by default
        cancelled = await client.delete(f"/tasks/{answer['task_id']}")
        assert cancelled.json()["status"] == "CANCELLED"


async def test_only_the_keys_in_priority_high_keys_may_submit_high(
    make_client: ClientFactory,
) -> None:
    keys = (SecretStr("vip"), SecretStr("other"))
    async with make_client(
        worker=False, api_keys=keys, priority_high_keys=keys[:1], priority_lanes=True
    ) as client:
        body = {"prompt": "me first", "priority": "high"}
        allowed = await submit(client, body, **{"X-API-Key": "vip"})
        refused = await submit(client, body, **{"X-API-Key": "other"})
        low = await submit(client, {"prompt": "x", "priority": "low"}, **{"X-API-Key": "other"})
        read = await client.get(f"/tasks/{allowed.json()['task_id']}", headers={"X-API-Key": "vip"})
    assert allowed.status_code == 202
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith("priority: high is not open")
    assert low.status_code == 202
    assert read.json()["priority"] == "high"
