"""Fuzzing a real api process: no input gets a 5xx, and no answer leaks a traceback."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from .conftest import Launcher

pytestmark = pytest.mark.slow

API_KEY = "fuzz-key-1"
# Enough to cover every operation many times over, and to finish well inside a minute.
SCHEMA_EXAMPLES = 300
RAW_EXAMPLES = 1000
# No shrinking: a failure is reported as found, so a failing run stays as short as a passing one.
FUZZ_SETTINGS = settings(
    max_examples=SCHEMA_EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def assert_clean(status: int, body: str, what: str) -> None:
    assert status < 500, f"{what} -> {status}: {body[:500]}"
    for leak in ("Traceback", 'File "', "Exception:", "redis.exceptions"):
        assert leak not in body, f"{what} leaked {leak!r}: {body[:500]}"
    if status >= 400:
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            pytest.fail(f"{what} -> {status} without the JSON error shape: {body[:500]}")
        assert set(error) == {"code", "message"}, body


def test_schemathesis_finds_no_server_error_in_the_openapi_schema(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(redis_url)
    schema = schemathesis.openapi.from_url(api.base_url + "/openapi.json")
    strategy = st.one_of(
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    seen: dict[str, set[int]] = {}
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        response = case.call(base_url=api.base_url, timeout=10)
        assert_clean(response.status_code, response.text, f"{case.method} {case.formatted_path}")
        seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

    fuzz()
    print(
        f"\nreliability[fuzz-schemathesis]: examples={SCHEMA_EXAMPLES} operations={len(seen)} "
        f"statuses={ {op: sorted(codes) for op, codes in sorted(seen.items())} } "
        f"seconds={time.monotonic() - started:.1f}"
    )
    assert "POST /tasks" in seen
    assert "GET /tasks/{task_id}" in seen


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
well_formed_tasks = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=50),
        "params": st.dictionaries(
            st.sampled_from(["duration", "fail", "retryable", "model"]) | st.text(max_size=10),
            json_values,
            max_size=4,
        ),
    }
).map(lambda value: json.dumps(value).encode())
task_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {"prompt": json_values},
        optional={"params": json_values, "extra": json_values},
    ).map(lambda value: json.dumps(value).encode()),
    well_formed_tasks,
    well_formed_tasks,
    st.just(b'{"prompt": "x", "params": {"duration": NaN}}'),
    st.just(b'{"prompt": "x", "params": {"duration": 1e999}}'),
)
# Any value HTTP/1.1 can carry: visible bytes, inner spaces, nothing at either end.
header_values = st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=80).map(
    lambda value: value.strip(" ").encode("latin-1")
)
# Mostly a valid key, so that most requests get past authentication to the deeper checks.
credentials = st.one_of(
    st.just([(b"authorization", b"Bearer " + API_KEY.encode())]),
    st.just([(b"x-api-key", API_KEY.encode())]),
    st.just([(b"authorization", b"Bearer " + API_KEY.encode())]),
    st.lists(
        st.tuples(st.sampled_from([b"authorization", b"x-api-key"]), header_values), max_size=2
    ),
)
content_types = st.one_of(
    st.just(b"application/json"),
    st.just(b"application/json"),
    st.sampled_from(
        [
            b"application/json; charset=utf-8",
            b"application/problem+json",
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=x",
        ]
    ),
    header_values,
)
task_ids = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
)


def test_random_bodies_headers_and_ids_get_no_server_error(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(redis_url, API_KEYS=f"{API_KEY},other-key", MAX_BODY_BYTES="4096")
    statuses: dict[int, int] = {}
    started = time.monotonic()
    with httpx.Client(base_url=api.base_url, timeout=10) as client:

        @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
        @given(
            method=st.sampled_from(["POST", "POST", "GET", "DELETE", "PUT"]),
            task_id=task_ids,
            body=task_bodies,
            content_type=content_types,
            credentials=credentials,
            idempotency_key=st.none() | header_values,
            wait=st.none() | st.text(max_size=8),
        )
        def fuzz(
            method: str,
            task_id: str,
            body: bytes,
            content_type: bytes,
            credentials: list[tuple[bytes, bytes]],
            idempotency_key: bytes | None,
            wait: str | None,
        ) -> None:
            headers = [(b"content-type", content_type), *credentials]
            if idempotency_key is not None:
                headers.append((b"idempotency-key", idempotency_key))
            url = "/tasks" if method == "POST" else "/tasks/" + quote(task_id, safe="")
            params = {"wait": wait} if wait is not None else None
            response = client.request(method, url, content=body, headers=headers, params=params)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert_clean(response.status_code, response.text, f"{method} {url}")

        fuzz()
    print(
        f"\nreliability[fuzz-hypothesis]: examples={sum(statuses.values())} "
        f"statuses={dict(sorted(statuses.items()))} seconds={time.monotonic() - started:.1f}"
    )
    assert statuses.get(202, 0) + statuses.get(200, 0) > 0  # some requests got all the way in


NESTING_BODY_BYTES = 16384
openers = st.sampled_from(["[", '{"a":', "[1,", '{"params":', '[{"x":['])


@st.composite
def nested_bodies(draw: st.DrawFn) -> bytes:
    """A task whose params nest to any depth that still fits in the body limit.

    Some carry a lone surrogate escape first: pydantic's parser stops at it, and the body is
    then read a second time by a parser that recurses once per level.
    """
    opener = draw(openers)
    closer = "".join({"[": "]", "{": "}"}[c] for c in reversed(opener) if c in "[{")
    head = '{"prompt": "' + draw(st.sampled_from(["deep", "\\ud800"])) + '", "params": {"a": '
    middle = draw(st.sampled_from(["1", '"x"', "[]", "{}", "null"]))
    room = (NESTING_BODY_BYTES - len(head) - len(middle) - 2) // (len(opener) + len(closer))
    depth = draw(st.integers(1, room) | st.sampled_from([199, 200, 201, room]))
    return (head + opener * depth + middle + closer * depth + "}}").encode()


def test_any_nesting_that_fits_the_body_limit_gets_an_answer_not_a_traceback(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(
        redis_url, API_KEYS=API_KEY, MAX_BODY_BYTES=str(NESTING_BODY_BYTES), MAX_BACKLOG="0"
    )
    statuses: dict[int, int] = {}
    deepest_refused = 0
    with httpx.Client(base_url=api.base_url, timeout=10) as client:

        @settings(FUZZ_SETTINGS, max_examples=300)
        @given(body=nested_bodies(), authenticated=st.booleans())
        def fuzz(body: bytes, authenticated: bool) -> None:
            nonlocal deepest_refused
            headers = {"content-type": "application/json"}
            if authenticated:
                headers["x-api-key"] = API_KEY
            response = client.post("/tasks", content=body, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert_clean(response.status_code, response.text, f"POST /tasks {body[:60]!r}")
            if not authenticated:
                # Authentication comes before the body is read: no key is a 401, whatever it holds.
                assert response.status_code == 401, response.text
                return
            assert response.status_code in (200, 202, 422), response.text
            if response.status_code == 422:
                message = response.json()["error"]["message"]
                assert message.startswith(("prompt", "params", "body")), message
                deepest_refused = max(deepest_refused, body.count(b"[") + body.count(b"{"))

        fuzz()
    print(
        f"\nreliability[fuzz-nesting]: statuses={dict(sorted(statuses.items()))} "
        f"deepest_refused_levels={deepest_refused}"
    )
    for leak in ("Traceback", "RecursionError", "unhandled error"):
        assert leak not in api.log, api.log[-2000:]
    assert statuses.get(401, 0) > 0
    assert statuses.get(422, 0) > 0
