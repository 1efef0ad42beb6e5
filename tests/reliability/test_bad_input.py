"""Inputs the fuzz runs turned up, pinned down: each is refused with a 422 naming the field.

The app runs in-process on a real Redis; ASGITransport is told not to re-raise, so a crash
shows as the 500 a client would get.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from fastapi_redis_mini.api.app import create_app
from fastapi_redis_mini.core.settings import Settings


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        yield client


async def post_raw(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await client.post("/tasks", content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "x", "params": {"n": 18446744073709551616}}',
        b'{"prompt": "x", "params": {"n": -9223372036854775809}}',
        b'{"prompt": "x", "params": {"duration": 18446744073709551616}}',
    ],
    ids=["above-uint64", "below-int64", "duration-above-uint64"],
)
async def test_params_integers_beyond_64_bits_get_422_not_500(
    client: httpx.AsyncClient, body: bytes
) -> None:
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("params")


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "x", "params": {"k": "\\udc00"}}',
        b'{"prompt": "x", "params": {"\\ud800": 1}}',
    ],
    ids=["in-a-value", "in-a-key"],
)
async def test_params_with_lone_surrogates_get_422_not_500(
    client: httpx.AsyncClient, body: bytes
) -> None:
    # The prompt already gets a 422 for this; params must too.
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("params")


@pytest.mark.parametrize(
    "body",
    [b'{"prompt": "caf\xe9"}', b'{"prompt": "x", "params": {"k": "\xff\xfe"}}'],
    ids=["in-the-prompt", "in-params"],
)
async def test_bytes_that_are_not_utf8_get_422_not_400(
    client: httpx.AsyncClient, body: bytes
) -> None:
    response = await post_raw(client, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("body: not valid JSON"), error


async def test_a_body_that_is_not_json_gets_422_saying_so(client: httpx.AsyncClient) -> None:
    for body in (b"", b"{", b"[1, 2]", b'"prompt"'):
        response = await post_raw(client, body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["message"].startswith("body"), (body, response.text)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
async def test_non_finite_numbers_in_params_are_refused(
    client: httpx.AsyncClient, literal: bytes
) -> None:
    # Not JSON (RFC 8259), and stored as null, so {"n": NaN} would share {"n": null}'s result.
    response = await post_raw(client, b'{"prompt": "x", "params": {"n": %s}}' % literal)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("params")


async def test_unknown_top_level_fields_are_refused_but_params_keys_are_free(
    client: httpx.AsyncClient,
) -> None:
    refused = await client.post("/tasks", json={"prompt": "x", "urgency": 1})
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith("urgency")
    accepted = await client.post("/tasks", json={"prompt": "x", "params": {"urgency": 1}})
    plain = await client.post("/tasks", json={"prompt": "x"})
    assert (accepted.status_code, plain.status_code) == (202, 202)
    # Unknown params keys are part of the signature: these are two different tasks.
    assert accepted.json()["task_id"] != plain.json()["task_id"]


async def test_a_body_streamed_without_content_length_is_cut_off_at_the_limit(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(settings.max_body_bytes // 1000 + 1):
            yield b"x" * 1000
        yield b'"}'

    response = await client.post(
        "/tasks", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"prompt": "a", "prompt": "b"}', "prompt"),
        (b'{"prompt": "a", "params": {"model": "x", "model": "y"}}', "model"),
        (b'{"prompt": "a\\":b", "params": {"n": 1, "n": 2}}', "n"),
        (b'{"prompt": "a", "params": {"n": 1, "\\u006e": 2}}', "n"),
        (b'{"prompt": "v", "params": {":x": 1, "z": "w",  ":x": 2}}', ":x"),
    ],
    ids=["top-level", "in-params", "after-a-colon-in-a-string", "escaped", "key-opening-colon"],
)
async def test_a_repeated_key_is_refused_naming_it(
    client: httpx.AsyncClient, body: bytes, field: str
) -> None:
    # Parsers disagree on which of two equal keys wins; a proxy may check the first.
    answer = await post_raw(client, body)
    assert answer.status_code == 422
    assert answer.json()["error"]["message"] == f"{field}: duplicate key in the JSON object"


async def test_one_key_in_two_objects_is_no_repeat(client: httpx.AsyncClient) -> None:
    answer = await post_raw(client, b'{"prompt": "a", "params": {"prompt": "b", "x": {"x": 1}}}')
    assert answer.status_code == 202


async def test_a_string_value_holding_a_quote_and_colon_is_still_accepted(
    client: httpx.AsyncClient,
) -> None:
    answer = await post_raw(client, b'{"prompt": "say \\":\\" twice \\" :", "params": {"a": 1}}')
    assert answer.status_code == 202


@pytest.mark.parametrize(
    "body",
    [
        b'\xef\xbb\xbf{"prompt": "x"}',
        '{"prompt": "x"}'.encode("utf-16"),
        '{"prompt": "\\ud800 x"}'.encode("utf-16-le"),
        b'\xef\xbb\xbf{"prompt": "\\ud800"}',
    ],
    ids=["utf8-bom", "utf16", "utf16-lone-surrogate", "bom-lone-surrogate"],
)
async def test_only_utf8_json_without_a_byte_order_mark_is_read(
    client: httpx.AsyncClient, body: bytes
) -> None:
    answer = await post_raw(client, body)
    assert answer.status_code == 422
    assert answer.json()["error"]["message"].startswith("body: not valid JSON")


@pytest.mark.parametrize(
    "content_type",
    ["application/evil+json", "text/json", "application/json; charset=utf-16", "text/plain"],
)
async def test_media_types_other_than_utf8_application_json_get_415(
    client: httpx.AsyncClient, content_type: str
) -> None:
    answer = await client.post(
        "/tasks", content=b'{"prompt": "x"}', headers={"content-type": content_type}
    )
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_media_type"


async def test_a_body_that_is_not_an_object_is_refused_naming_the_body(
    client: httpx.AsyncClient,
) -> None:
    answer = await post_raw(client, b'["prompt", "x"]')
    assert answer.status_code == 422
    assert answer.json()["error"]["message"].startswith("body: ")


async def test_application_json_with_charset_utf8_is_accepted(client: httpx.AsyncClient) -> None:
    answer = await client.post(
        "/tasks",
        content=b'{"prompt": "x"}',
        headers={"content-type": "Application/JSON; charset=UTF-8"},
    )
    assert answer.status_code == 202
