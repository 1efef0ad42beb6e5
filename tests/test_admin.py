"""The operator's dead-letter commands, run as a real process against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import orjson
import pytest
import redis

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.queue import WebhookMessage, WebhookVerdict
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.ports import free_port

pytestmark = pytest.mark.slow  # the commands run as processes


def admin(redis_url: str, *args: str, partitions: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.admin", *args],
        env={**os.environ, "REDIS_URL": redis_url, "QUEUE_PARTITIONS": str(partitions)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_dead_letters_are_listed_and_replayed(settings: Settings, redis_url: str) -> None:
    queue = RedisTaskQueue(connect(settings), settings)
    await queue.ensure_group()
    task = TaskCreate(prompt="poison")
    task_id = (await queue.submit(task, signature=request_signature(task))).task_id
    deliveries = await queue.read("w", count=1, block_ms=100)
    for _ in range(settings.max_deliveries + 1):
        await queue.start("w", deliveries, alone=True)
    await queue.close()

    listed = admin(redis_url, "dead-letter", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"task={task_id}" in listed.stdout
    assert "dead-lettered: delivered 5 times" in listed.stdout

    replayed = admin(redis_url, "dead-letter", "replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 of 1" in replayed.stdout
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.hget(f"task:{task_id}", "status") == "PENDING"
    assert client.xlen("task_stream:dead") == 0
    client.close()
    assert '"dead_letter_length":0' in admin(redis_url, "stats").stdout


async def test_stats_and_replay_cover_every_partition(settings: Settings, redis_url: str) -> None:
    partitioned = settings.model_copy(update={"queue_partitions": 4})
    queue = RedisTaskQueue(connect(partitioned), partitioned)
    await queue.ensure_group()
    ids = []
    for n in range(12):
        task = TaskCreate(prompt=f"poison {n}")
        ids.append((await queue.submit(task, signature=request_signature(task))).task_id)
    assert len({task_id.partition("-")[0] for task_id in ids}) > 1
    deliveries = await queue.read("w", count=100, block_ms=100)
    for _ in range(settings.max_deliveries + 1):
        await queue.start("w", deliveries, alone=True)
    await queue.close()

    stats = orjson.loads(admin(redis_url, "stats", partitions=4).stdout)
    assert stats["dead_letter_length"] == 12
    assert sum(p["dead_letter_length"] for p in stats["partitions"]) == 12
    assert len(stats["partitions"]) == 4
    listed = admin(redis_url, "dead-letter", "list", partitions=4)
    assert sorted(re.findall(r"task=(\S+)", listed.stdout)) == sorted(ids)
    replayed = admin(redis_url, "dead-letter", "replay", "--all", partitions=4)
    assert "replayed 12 of 12" in replayed.stdout, replayed.stderr
    stats = orjson.loads(admin(redis_url, "stats", partitions=4).stdout)
    assert (stats["dead_letter_length"], stats["lag"]) == (0, 12)


def test_an_unreachable_redis_is_one_line_not_a_traceback() -> None:
    answer = admin(f"redis://127.0.0.1:{free_port()}/0", "stats")
    assert answer.returncode == 1
    assert answer.stderr.startswith("redis cannot serve this now (unreachable:")
    assert "Traceback" not in answer.stderr


async def test_webhook_dead_letters_are_listed_as_json_lines(
    settings: Settings, redis_url: str
) -> None:
    queue = RedisTaskQueue(connect(settings), settings)
    task_id = "a" * 32
    fields = {"task_id": task_id, "url": "https://hooks.example/x", "error": "answered 500"}
    message = WebhookMessage("msg_1", task_id, fields["url"], "completed", time.time(), {})
    await queue.enqueue_webhooks([message])
    [claimed] = await queue.claim_webhooks(1, lease=60)
    claimed.last_error = fields["error"]
    assert await queue.settle_webhook(claimed, WebhookVerdict.DEAD)
    await queue.close()
    listed = admin(redis_url, "webhooks", "dead-letter")
    assert listed.returncode == 0, listed.stderr
    [line] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert {key: line[key] for key in fields} == fields
