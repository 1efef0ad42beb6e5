"""Quotas per API key: a submit rate (token bucket) and a cap on tasks not final yet."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import redis.asyncio
from pydantic import SecretStr

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.queue import SubmitOutcome
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings

from .conftest import ClientFactory

KEY_A, KEY_B = "quota-key-a", "quota-key-b"
KEYS = (SecretStr(KEY_A), SecretStr(KEY_B))
A, B = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}
# draft-ietf-httpapi-ratelimit-headers-09: a String item and its parameters.
FIELD = re.compile(r'^"submits";(q=\d+;w=\d+|r=\d+;t=\d+)$')


async def post(client: httpx.AsyncClient, prompt: str, headers: dict[str, str]) -> httpx.Response:
    return await client.post("/tasks", json={"prompt": prompt}, headers=headers)


async def test_a_key_over_its_submit_rate_gets_429_with_retry_after_and_ratelimit_fields(
    make_client: ClientFactory,
) -> None:
    async with make_client(
        worker=False, api_keys=KEYS, submit_rate_per_key=2, submit_burst_per_key=3
    ) as client:
        answers = [await post(client, f"p{n}", A) for n in range(4)]
        other_key = await post(client, "p0", B)
        await asyncio.sleep(0.6)  # a token back at 2 a second
        later = await post(client, "later", A)
    assert [answer.status_code for answer in answers] == [202, 202, 202, 429]
    for answer in answers:
        assert FIELD.match(answer.headers["ratelimit-policy"])
        assert FIELD.match(answer.headers["ratelimit"])
    assert answers[0].headers["ratelimit-policy"] == '"submits";q=3;w=2'
    assert [a.headers["ratelimit"].split(";")[1] for a in answers] == ["r=2", "r=1", "r=0", "r=0"]
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "SUBMIT_RATE_PER_KEY" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    assert other_key.status_code == 202  # each key has its own bucket
    assert later.status_code == 202


async def test_a_key_at_max_unfinished_is_refused_until_one_of_its_tasks_is_final(
    make_client: ClientFactory,
) -> None:
    async with make_client(worker=False, api_keys=KEYS, max_unfinished_per_key=2) as client:
        first = await post(client, "one", A)
        second = await post(client, "two", A)
        third = await post(client, "three", A)
        other_key = await post(client, "three", B)
        cancelled = await client.delete(f"/tasks/{first.json()['task_id']}", headers=A)
        after_cancel = await post(client, "three", A)
        again = await post(client, "four", A)
    assert [first.status_code, second.status_code, third.status_code] == [202, 202, 429]
    assert third.json()["error"]["code"] == "too_many_unfinished"
    assert "MAX_UNFINISHED_PER_KEY" in third.json()["error"]["message"]
    assert third.headers["retry-after"] == "5"
    assert other_key.status_code == 202
    assert cancelled.status_code == 202
    assert after_cancel.status_code == 202
    assert again.status_code == 429


async def test_a_key_over_max_stored_bytes_is_refused_until_its_tasks_expire(
    make_client: ClientFactory,
) -> None:
    # About 1,000 bytes of prompt plus the fixed 512 per task: one fits in 3,000, two do not.
    big = "x" * 1000
    async with make_client(
        worker=False, api_keys=KEYS, max_stored_bytes_per_key=3000, result_expiry=2
    ) as client:
        first = await post(client, big + "1", A)
        second = await post(client, big + "2", A)
        small_from_a = await post(client, "small", A)
        other_key = await post(client, big + "2", B)
        await asyncio.sleep(2.3)  # the first task expires, and its bytes with it
        after_expiry = await post(client, big + "3", A)
    assert [first.status_code, second.status_code] == [202, 429]
    error = second.json()["error"]
    assert error["code"] == "too_many_stored_bytes"
    assert "MAX_STORED_BYTES_PER_KEY" in error["message"]
    assert 1 <= int(second.headers["retry-after"]) <= 3
    assert small_from_a.status_code == 202  # what still fits is taken
    assert other_key.status_code == 202
    assert after_expiry.status_code == 202


async def test_finished_tasks_stop_counting_against_max_unfinished(
    make_client: ClientFactory,
) -> None:
    async with make_client(api_keys=KEYS, max_unfinished_per_key=1) as client:
        first = await client.post(
            "/tasks", json={"prompt": "quick", "params": {"duration": 0.1}}, headers=A
        )
        done = await client.get(f"/tasks/{first.json()['task_id']}?wait=10", headers=A)
        second = await post(client, "next", A)
    assert first.status_code == 202
    assert done.json()["status"] == "DONE"
    assert second.status_code == 202


async def reset_command_stats(redis_client: redis.asyncio.Redis) -> None:
    client: Any = redis_client
    if isinstance(client, redis.asyncio.RedisCluster):
        await client.config_resetstat(target_nodes=redis.asyncio.RedisCluster.PRIMARIES)
    else:
        await client.config_resetstat()


async def script_calls(redis_client: redis.asyncio.Redis) -> int:
    """EVALSHA calls since the reset: on a cluster, summed over its masters."""
    client: Any = redis_client
    if isinstance(client, redis.asyncio.RedisCluster):
        nodes = await client.info("commandstats", target_nodes=redis.asyncio.RedisCluster.PRIMARIES)
        stats = list(nodes.values())
    else:
        stats = [await client.info("commandstats")]
    return sum(int(node.get("cmdstat_evalsha", {}).get("calls", 0)) for node in stats)


async def test_quotas_travel_in_the_submit_script_call_of_a_batch(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    limited = settings.model_copy(
        update={"api_keys": KEYS, "submit_rate_per_key": 1, "submit_burst_per_key": 3}
    )
    queue = RedisTaskQueue(connect(limited), limited)
    try:
        await queue.submit(TaskCreate(prompt="warm"), signature="w", scope="other")
        await reset_command_stats(redis_client)
        tasks = [TaskCreate(prompt=f"t{n}") for n in range(6)]
        answers = await asyncio.gather(
            *(queue.submit(t, signature=request_signature(t), scope="tenant") for t in tasks)
        )
        calls = await script_calls(redis_client)
    finally:
        await queue.close()
    assert calls == 1  # six submits and their quota: one call
    assert [answer.outcome for answer in answers] == [
        *[SubmitOutcome.QUEUED] * 3,
        *[SubmitOutcome.RATE_LIMITED] * 3,
    ]
    assert [answer.quota.remaining if answer.quota else None for answer in answers] == [
        2, 1, 0, 0, 0, 0
    ]  # fmt: skip
