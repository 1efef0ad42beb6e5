"""The task routes: contract, cache, long-poll, errors. The app runs in-process on a real Redis."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import redis.asyncio
from pydantic import SecretStr

from fastapi_redis_mini.core.models import TASK_ID_PATTERN, Task, TaskCreate, request_signature
from fastapi_redis_mini.core.redis.keys import Partitions

from .conftest import ClientFactory

JSON = {"content-type": "application/json"}


async def submit(client: httpx.AsyncClient, body: object, **headers: str) -> httpx.Response:
    return await client.post("/tasks", json=body, headers=headers)


async def test_submit_answers_202_with_a_pending_task(
    client: httpx.AsyncClient, partitions: Partitions
) -> None:
    response = await submit(client, {"prompt": "hi", "params": {"duration": 0.2}})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "PENDING"
    assert body["cached"] is False
    # 32 hex digits, after `<partition>-` when there are several partitions.
    assert partitions.of_task(body["task_id"]) is not None
    assert len(body["task_id"].rpartition("-")[2]) == 32


async def test_a_task_goes_pending_running_done(client: httpx.AsyncClient) -> None:
    task_id = (await submit(client, {"prompt": "a b c", "params": {"duration": 0.6}})).json()[
        "task_id"
    ]
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = (await client.get(f"/tasks/{task_id}")).json()["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "DONE":
            break
        await asyncio.sleep(0.05)
    assert seen[-2:] == ["RUNNING", "DONE"]
    assert set(seen) <= {"PENDING", "RUNNING", "DONE"}
    task = (await client.get(f"/tasks/{task_id}")).json()
    assert task["result"]["model"] == "sim-1"
    assert task["result"]["output"].endswith("c b a")
    assert task["result"]["prompt_tokens"] == 3
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    assert task["error"] is None


async def test_an_identical_submit_is_a_cache_hit(client: httpx.AsyncClient) -> None:
    body = {"prompt": "same", "params": {"model": "m"}}
    first = (await submit(client, body)).json()
    done = (await client.get(f"/tasks/{first['task_id']}", params={"wait": 5})).json()
    again = await submit(client, {"params": {"model": "m"}, "prompt": "same"})
    assert again.status_code == 200
    hit = again.json()
    assert (hit["status"], hit["cached"], hit["result"]) == ("DONE", True, done["result"])
    # The hit names the task that computed the result, which GET still shows.
    assert hit["task_id"] == first["task_id"]
    stored = (await client.get(f"/tasks/{hit['task_id']}")).json()
    assert (stored["status"], stored["result"]) == ("DONE", done["result"])


async def test_a_failing_task_is_failed_with_its_error(client: httpx.AsyncClient) -> None:
    task_id = (await submit(client, {"prompt": "x", "params": {"fail": True}})).json()["task_id"]
    task = (await client.get(f"/tasks/{task_id}", params={"wait": 5})).json()
    assert task["status"] == "FAILED"
    assert task["error"] == "TaskFailedError: simulated failure requested by params.fail"
    assert task["result"] is None


async def test_long_poll_returns_as_soon_as_the_task_ends(client: httpx.AsyncClient) -> None:
    task_id = (await submit(client, {"prompt": "p", "params": {"duration": 0.5}})).json()["task_id"]
    started = time.monotonic()
    task = (await client.get(f"/tasks/{task_id}", params={"wait": 20})).json()
    elapsed = time.monotonic() - started
    assert task["status"] == "DONE"
    assert elapsed < 5, f"long-poll took {elapsed:.1f}s for a 0.5 s task"


async def test_long_poll_gives_up_after_wait_seconds(make_client: ClientFactory) -> None:
    async with make_client(worker=False) as client:
        task_id = (await submit(client, {"prompt": "nobody runs me"})).json()["task_id"]
        started = time.monotonic()
        task = (await client.get(f"/tasks/{task_id}", params={"wait": 0.5})).json()
        assert task["status"] == "PENDING"
        assert 0.4 < time.monotonic() - started < 3


async def test_unknown_and_malformed_ids_get_404(client: httpx.AsyncClient) -> None:
    for task_id in ("0" * 32, "not-an-id", "A" * 32):
        response = await client.get(f"/tasks/{task_id}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "task_not_found"


async def test_invalid_bodies_get_422_naming_the_field(client: httpx.AsyncClient) -> None:
    cases = {
        "prompt": {"params": {}},
        "params.duration": {"prompt": "x", "params": {"duration": -1}},
        "params.fail": {"prompt": "x", "params": {"fail": "yes"}},
        "colour": {"prompt": "x", "colour": "red"},
    }
    for field, body in cases.items():
        response = await submit(client, body)
        assert response.status_code == 422, body
        assert response.json()["error"]["message"].startswith(field), response.json()


async def test_wait_outside_its_range_is_refused(client: httpx.AsyncClient) -> None:
    task_id = (await submit(client, {"prompt": "x"})).json()["task_id"]
    for wait in ("0", "31", "soon", "nan", "inf"):
        response = await client.get(f"/tasks/{task_id}", params={"wait": wait})
        assert response.status_code == 422
        assert response.json()["error"]["message"].startswith("wait: "), wait


async def test_cancel_of_a_pending_task(make_client: ClientFactory) -> None:
    async with make_client(worker=False) as client:
        task_id = (await submit(client, {"prompt": "never"})).json()["task_id"]
        response = await client.delete(f"/tasks/{task_id}")
        assert response.status_code == 202
        assert response.json()["status"] == "CANCELLED"
        again = await client.delete(f"/tasks/{task_id}")
        assert again.status_code == 409


async def test_cancel_of_a_running_task_stops_it(make_client: ClientFactory) -> None:
    async with make_client(claim_idle=0.6) as client:
        body = {"prompt": "long", "params": {"duration": 20}}
        task_id = (await submit(client, body)).json()["task_id"]
        deadline = time.monotonic() + 5
        while (await client.get(f"/tasks/{task_id}")).json()["status"] != "RUNNING":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        response = await client.delete(f"/tasks/{task_id}")
        assert response.json()["cancel_requested"] is True
        task = (await client.get(f"/tasks/{task_id}", params={"wait": 5})).json()
        assert task["status"] == "CANCELLED"
        assert task["error"] == "cancelled while running"


async def test_health_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200


async def test_openapi_describes_the_task_routes(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert {"/tasks", "/tasks/{task_id}"} <= set(schema["paths"])
    assert schema["paths"]["/tasks"]["post"]["summary"] == "Submit Task"


async def test_openapi_operation_ids_are_the_endpoint_names(client: httpx.AsyncClient) -> None:
    # Generated clients name their calls after these.
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {
        (method, path): operation["operationId"]
        for path, operations in paths.items()
        for method, operation in operations.items()
    } == {
        ("post", "/tasks"): "submit_task",
        ("get", "/tasks/{task_id}"): "get_task",
        ("delete", "/tasks/{task_id}"): "cancel_task",
        ("get", "/tasks/{task_id}/events"): "task_events",
        ("get", "/healthz"): "healthz",
        ("get", "/readyz"): "readyz",
    }


async def test_openapi_documents_what_the_request_routes_parse_themselves(
    client: httpx.AsyncClient,
) -> None:
    # The task routes read their body and parameters without FastAPI's parameter machinery;
    # the document must still describe every one of them, from the models they parse with.
    document = (await client.get("/openapi.json")).json()
    paths, components = document["paths"], document["components"]["schemas"]
    submit = paths["/tasks"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TaskCreate"
    }
    # Its enums are components of their own, as pydantic's $defs are in the model's schema.
    schema = TaskCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs").items():
        assert components[name] == definition
    # FastAPI leaves out a default of null (the optional webhook fields).
    for field in schema["properties"].values():
        if "default" in field and field["default"] is None:
            del field["default"]
    assert components["TaskCreate"] == schema
    assert set(schema["properties"]) == {"prompt", "params", "priority", "delay_seconds",
                                         "run_at", "deadline_seconds", "webhook",
                                         "webhook_events"}  # fmt: skip
    [key] = submit["parameters"]
    assert (key["name"], key["in"], key["required"]) == ("Idempotency-Key", "header", False)
    [key_schema, _null] = key["schema"]["anyOf"]
    assert (key_schema["minLength"], key_schema["maxLength"]) == (1, 255)
    assert set(submit["responses"]) >= {"200", "202", "401", "413", "415", "422", "429", "503"}
    for method in ("get", "delete"):
        operation = paths["/tasks/{task_id}"][method]
        parameters = {p["name"]: p for p in operation["parameters"]}
        assert parameters["task_id"]["in"] == "path"
        assert parameters["task_id"]["schema"]["pattern"] == TASK_ID_PATTERN
        # They read no body, so neither can be too large or not JSON.
        assert not {"413", "415"} & set(operation["responses"])
        assert operation["responses"]["202" if method == "delete" else "200"]["content"][
            "application/json"
        ]["schema"] == {"$ref": "#/components/schemas/Task"}
    [wait, _null] = parameters_of(paths["/tasks/{task_id}"]["get"])["wait"]["schema"]["anyOf"]
    assert (wait["exclusiveMinimum"], wait["maximum"]) == (0, 30)


def parameters_of(operation: dict[str, Any]) -> dict[str, Any]:
    return {parameter["name"]: parameter for parameter in operation["parameters"]}


async def test_an_idempotency_key_outside_its_limits_is_refused_naming_the_header(
    client: httpx.AsyncClient,
) -> None:
    for key in ("x" * 256, "two words"):
        response = await submit(client, {"prompt": "x"}, **{"Idempotency-Key": key})
        assert response.status_code == 422, key
        assert response.json()["error"]["message"].startswith("Idempotency-Key: "), key
    accepted = await submit(client, {"prompt": "x"}, **{"Idempotency-Key": "k" * 255})
    assert accepted.status_code == 202


async def test_repeats_of_an_idempotency_key_after_its_task_expired_make_one_task(
    make_client: ClientFactory, redis_client: redis.asyncio.Redis, partitions: Partitions
) -> None:
    key = {"Idempotency-Key": "order-17"}

    async def five_repeats(client: httpx.AsyncClient) -> set[str]:
        answers = await asyncio.gather(
            *(submit(client, {"prompt": "order"}, **key) for _ in range(5))
        )
        assert sorted(answer.status_code for answer in answers) == [200, 200, 200, 200, 202]
        return {answer.json()["task_id"] for answer in answers}

    async with make_client(
        worker=False, result_expiry=1, task_timeout=0.5, max_task_duration=0.5
    ) as client:
        first = (await submit(client, {"prompt": "order"}, **key)).json()["task_id"]
        await asyncio.sleep(2.2)
        assert (await client.get(f"/tasks/{first}")).status_code == 404
        [second] = await five_repeats(client)
        assert second != first
        # A key that outlived its task (as one written under a longer RESULT_EXPIRY can):
        # it is taken over, once.
        second_keys = partitions.of_task(second)
        assert second_keys is not None
        await redis_client.delete(second_keys.task(second))
        [third] = await five_repeats(client)
        assert third != second
        # A submit with an Idempotency-Key is decided in the partition of_submit names (with
        # single-flight, its request's).
        order = TaskCreate(prompt="order")
        home = partitions.of_submit(request_signature(order), "", "order-17")
        key_name = home.idempotency("order-17")
        # It names the task and the request it was first sent with.
        stored = await redis_client.get(key_name)
        assert stored is not None
        assert str(stored).split(":")[0] == third


async def test_a_tenants_task_is_answered_without_its_scope(make_client: ClientFactory) -> None:
    key = {"X-API-Key": "tenant-key"}
    async with make_client(worker=False, api_keys=(SecretStr("tenant-key"),)) as client:
        task_id = (await submit(client, {"prompt": "mine"}, **key)).json()["task_id"]
        read = await client.get(f"/tasks/{task_id}", headers=key)
        cancelled = await client.delete(f"/tasks/{task_id}", headers=key)
    public = set(Task.model_json_schema(mode="serialization")["properties"])
    assert "scope" not in public
    assert (read.status_code, set(read.json())) == (200, public)
    assert (cancelled.status_code, set(cancelled.json())) == (202, public)
    assert cancelled.json()["status"] == "CANCELLED"


async def test_a_webhook_is_taken_only_from_a_key_whose_deliveries_can_be_signed(
    make_client: ClientFactory,
) -> None:
    own = "whsec_" + base64.b64encode(b"the hooked key's own secret").decode()
    keys = (SecretStr("hooked"), SecretStr("plain"))
    body = {"prompt": "tell me when done", "webhook": "https://hooks.example/tasks"}
    # No WEBHOOK_SECRET: only the key WEBHOOK_KEY_SECRETS gives a secret may ask for one.
    secrets = ((keys[0], SecretStr(own)),)
    async with make_client(worker=False, api_keys=keys, webhook_key_secrets=secrets) as client:
        taken = await submit(client, body, **{"X-API-Key": "hooked"})
        refused = await submit(client, body, **{"X-API-Key": "plain"})
        no_webhook = await submit(client, {"prompt": "quietly"}, **{"X-API-Key": "plain"})
    assert taken.status_code == 202, taken.text
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith("webhook: this service has no ")
    assert no_webhook.status_code == 202
    async with make_client(worker=False, api_keys=keys) as client:
        assert (await submit(client, body, **{"X-API-Key": "hooked"})).status_code == 422
