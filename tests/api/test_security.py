"""What the security review asked of the routes: the key is checked before anything else, both
key headers read alike, waits are capped per key, and every answer carries the headers that
keep it out of caches and sniffers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import redis.asyncio
from pydantic import SecretStr

from fastapi_redis_mini.api._middleware import DOCS_CSP
from fastapi_redis_mini.core.redis.keys import Partitions

from .conftest import ClientFactory

KEY = "security-key"
KEYS = (SecretStr(KEY), SecretStr("other-key"))
MISSING = "0" * 32


async def test_the_key_is_checked_before_the_query_and_the_id(
    make_client: ClientFactory,
) -> None:
    async with make_client(worker=False, api_keys=KEYS) as client:
        bad_wait = await client.get(f"/tasks/{MISSING}?wait=99")
        bad_id = await client.get("/tasks/not-an-id")
        bad_body = await client.post("/tasks", content=b"{", headers={"content-type": "x/y"})
    assert [a.status_code for a in (bad_wait, bad_id, bad_body)] == [401, 401, 401]


async def test_x_api_key_is_trimmed_as_bearer_is(make_client: ClientFactory) -> None:
    async with make_client(worker=False, api_keys=KEYS) as client:
        padded = await client.get(f"/tasks/{MISSING}", headers={"X-API-Key": f"  {KEY} "})
        bearer = await client.get(f"/tasks/{MISSING}", headers={"Authorization": f"Bearer {KEY} "})
    assert padded.status_code == bearer.status_code == 404


async def test_every_answer_is_no_store_and_nosniff(make_client: ClientFactory) -> None:
    async with make_client(worker=False) as client:
        answers = [
            await client.post("/tasks", json={"prompt": "x"}),
            await client.get(f"/tasks/{MISSING}"),
            await client.post("/tasks", json={"prompt": ""}),
        ]
    assert [a.status_code for a in answers] == [202, 404, 422]
    for answer in answers:
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" not in answer.headers


async def test_the_docs_pages_carry_a_content_security_policy(make_client: ClientFactory) -> None:
    async with make_client(worker=False, docs_enabled=True) as client:
        page = await client.get("/docs")
        asset = await client.get("/docs/swagger-ui.css")
    assert page.headers["content-security-policy"] == DOCS_CSP.decode()
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert asset.status_code == 200
    assert "no-store" not in asset.headers.get("cache-control", "")


async def test_a_key_holding_max_waits_is_refused_another_until_one_ends(
    make_client: ClientFactory,
) -> None:
    other = {"X-API-Key": "other-key"}
    mine = {"X-API-Key": KEY}
    async with make_client(worker=False, api_keys=KEYS, max_waits_per_key=2) as client:
        task_id = (await client.post("/tasks", json={"prompt": "x"}, headers=mine)).json()[
            "task_id"
        ]
        holding = [
            asyncio.create_task(client.get(f"/tasks/{task_id}?wait=1.5", headers=mine))
            for _ in range(2)
        ]
        await asyncio.sleep(0.3)
        refused = await client.get(f"/tasks/{task_id}?wait=1", headers=mine)
        plain_read = await client.get(f"/tasks/{task_id}", headers=mine)
        other_key = await client.get(f"/tasks/{MISSING}?wait=0.1", headers=other)
        held = await asyncio.gather(*holding)
        after = await client.get(f"/tasks/{task_id}?wait=0.1", headers=mine)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_waits"
    assert "MAX_WAITS_PER_KEY" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    assert plain_read.status_code == 200  # only waits are capped
    assert other_key.status_code == 404  # each key has its own slots
    assert [a.status_code for a in held] == [200, 200]
    assert after.status_code == 200


async def test_tenant_ids_are_an_hmac_under_tenant_secret_not_a_bare_hash(
    make_client: ClientFactory, redis_client: redis.asyncio.Redis, partitions: Partitions
) -> None:
    mine = {"X-API-Key": KEY}
    legacy = hashlib.sha256(KEY.encode()).hexdigest()[:16]
    secret = "a-server-side-secret-of-32-chars"
    keyed = hmac.new(secret.encode(), KEY.encode(), hashlib.sha256).hexdigest()[:16]
    scopes = []
    for tenant_secret in (None, SecretStr(secret)):
        async with make_client(worker=False, api_keys=KEYS, tenant_secret=tenant_secret) as client:
            task_id = (await client.post("/tasks", json={"prompt": "x"}, headers=mine)).json()[
                "task_id"
            ]
            read = await client.get(f"/tasks/{task_id}", headers=mine)
        assert read.status_code == 200
        keys = partitions.of_task(task_id)
        assert keys is not None
        scopes.append(await redis_client.hget(keys.task(task_id), "scope"))
    assert scopes == [legacy, keyed]
