"""One API key floods a real api with the largest submits it accepts, as the security review
did: with the default quotas the flood is refused (429) long before Redis grows past the
key's MAX_STORED_BYTES_PER_KEY, and another key is still served."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis

from fastapi_redis_mini.core.settings import Settings

from .conftest import Launcher

pytestmark = [pytest.mark.slow, pytest.mark.single_server(reason="reads INFO memory of one server")]

FLOODER, BYSTANDER = "flooding-key-0123456789", "bystander-key-0123456789"
# The largest body the defaults take: 8,192 four-byte characters of prompt, escaped as JSON
# would send them, and 4 KB of params: about 53 KB on the wire.
PROMPT = "\U0001f600" * 8192
DEFAULTS = Settings.model_fields


def default(name: str) -> str:
    return str(DEFAULTS[name].default)


def submit_body(n: int) -> dict[str, object]:
    return {"prompt": PROMPT, "params": {"n": n, "pad": "p" * 3900}}


def used_memory(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


async def flood(base_url: str, count: int, concurrency: int = 16) -> list[httpx.Response]:
    answers: list[httpx.Response] = []
    queue = iter(range(count))
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

        async def sender() -> None:
            for n in queue:
                answers.append(
                    await client.post("/tasks", json=submit_body(n), headers={"X-API-Key": FLOODER})
                )

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return answers


def test_one_key_flooding_with_the_largest_submits_is_held_at_its_quota(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(
        redis_url,
        API_KEYS=f"{FLOODER},{BYSTANDER}",
        # The production defaults, which the suite turns off for other tests.
        SUBMIT_RATE_PER_KEY=default("submit_rate_per_key"),
        MAX_UNFINISHED_PER_KEY=default("max_unfinished_per_key"),
        MAX_STORED_BYTES_PER_KEY=default("max_stored_bytes_per_key"),
    )
    before = used_memory(redis_url)
    started = time.monotonic()
    answers = asyncio.run(flood(api.base_url, 1000))
    elapsed = time.monotonic() - started
    grown = used_memory(redis_url) - before
    bystander = httpx.post(
        f"{api.base_url}/tasks", json={"prompt": "still served"}, headers={"X-API-Key": BYSTANDER}
    )

    statuses = [answer.status_code for answer in answers]
    accepted, refused = statuses.count(202), statuses.count(429)
    assert accepted + refused == 1000, sorted(set(statuses))
    # A burst of 100, then 20 a second for as long as the flood lasts.
    assert 100 <= accepted <= 100 + 20 * (elapsed + 1)
    assert grown < accepted * 80_000  # what the accepted tasks cost, and nothing more
    assert grown < 64 * 1024 * 1024
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert "SUBMIT_RATE_PER_KEY" in answer.json()["error"]["message"]
    assert bystander.status_code == 202
    print(  # the figures docs/security.md quotes, seen with -s
        f"flood: {accepted} x 202, {refused} x 429 in {elapsed:.1f} s; "
        f"Redis grew {grown / 2**20:.1f} MiB"
    )


def test_the_stored_bytes_cap_holds_a_key_that_stays_under_its_rate(
    redis_url: str, launch: Launcher
) -> None:
    cap = 4 * 1024 * 1024
    api = launch.api(
        redis_url,
        API_KEYS=f"{FLOODER},{BYSTANDER}",
        SUBMIT_RATE_PER_KEY="0",
        MAX_STORED_BYTES_PER_KEY=str(cap),
    )
    before = used_memory(redis_url)
    answers = asyncio.run(flood(api.base_url, 300))
    grown = used_memory(redis_url) - before
    statuses = [answer.status_code for answer in answers]
    accepted = statuses.count(202)
    # Each stored request is about 37 KB (UTF-8) plus the 512 counted per task.
    assert 80 <= accepted <= cap // 37_000
    assert statuses.count(429) == 300 - accepted
    refusal = next(answer for answer in answers if answer.status_code == 429)
    assert refusal.json()["error"]["code"] == "too_many_stored_bytes"
    assert "MAX_STORED_BYTES_PER_KEY" in refusal.json()["error"]["message"]
    assert grown < 2 * cap, grown
    print(f"stored-bytes cap {cap} B: {accepted} x 202; Redis grew {grown / 2**20:.1f} MiB")
