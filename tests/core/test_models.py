"""The request signature and key names the data model fixes."""

from __future__ import annotations

import hashlib
import json

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.redis import Keys


def test_signature_is_sha256_of_the_canonical_body() -> None:
    task = TaskCreate(prompt="héllo", params={"b": 2, "a": {"y": 1, "x": [1, 2]}})
    canonical = json.dumps(
        {"prompt": "héllo", "params": {"b": 2, "a": {"y": 1, "x": [1, 2]}}},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    assert request_signature(task) == hashlib.sha256(canonical).hexdigest()


def test_key_order_does_not_change_the_signature() -> None:
    first = TaskCreate(prompt="p", params={"a": 1, "b": 2})
    second = TaskCreate(prompt="p", params={"b": 2, "a": 1})
    assert request_signature(first) == request_signature(second)
    assert request_signature(first) != request_signature(TaskCreate(prompt="p", params={"a": 1}))


def test_keys_follow_the_data_model_and_take_a_prefix() -> None:
    keys = Keys(prefix="", queue="task_stream", group="workers")
    assert keys.task("abc") == "task:abc"
    assert keys.cache("sig") == "cache:sig"
    assert keys.stream == "task_stream"
    prefixed = Keys(prefix="staging:", queue="task_stream", group="workers")
    assert prefixed.task("abc") == "staging:task:abc"
    assert prefixed.stream == "staging:task_stream"
    assert prefixed.cache("sig", scope="tenant") == "staging:cache:tenant:sig"
