"""The queue's layout (partitions, lanes) is recorded by the first process to use it, and a
process of another layout is refused before it touches a key: it would use other keys than
the processes already running, and their tasks would never run."""

from __future__ import annotations

import pytest
import redis.asyncio

from fastapi_redis_mini.core.queue import LayoutMismatch
from fastapi_redis_mini.core.redis import Keys, RedisTaskQueue, connect
from fastapi_redis_mini.core.redis.keys import layout, layout_reasons
from fastapi_redis_mini.core.settings import Settings

NO_QUOTAS = {"submit_rate_per_key": 0, "max_unfinished_per_key": 0, "max_stored_bytes_per_key": 0}


async def check(settings: Settings) -> None:
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        await queue.check_layout()
    finally:
        await queue.close()


def layout_key(settings: Settings) -> str:
    return Keys.from_settings(settings, cluster=False).layout


async def test_the_first_process_records_its_layout_and_the_same_one_passes(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    await check(settings)
    queue = RedisTaskQueue(connect(settings), settings)
    cluster = isinstance(queue.redis, redis.asyncio.RedisCluster)
    await queue.close()
    key = Keys.from_settings(settings, cluster=cluster).layout
    recorded = await redis_client.get(key)
    # The suite runs without quotas: a cluster's default is 16 partitions, a server's 1.
    assert recorded == f"partitions={16 if cluster else 1} priority_lanes=false"
    await check(settings)  # the same layout again: nothing to say
    assert await redis_client.get(key) == recorded


async def test_another_partition_count_is_refused_naming_both_and_the_setting(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    one = settings.model_copy(update={**NO_QUOTAS, "queue_partitions": 1})
    four = settings.model_copy(update={**NO_QUOTAS, "queue_partitions": 4})
    await check(one)
    with pytest.raises(LayoutMismatch) as refused:
        await check(four)
    message = str(refused.value)
    assert "laid out as partitions=1 priority_lanes=false" in message
    assert "settings give partitions=4 priority_lanes=false (QUEUE_PARTITIONS=4;" in message
    assert "delete that key" in message
    # Refused before it made anything of its own: no stream of a fourth partition.
    assert not [k async for k in redis_client.scan_iter(match="*task_stream*") if "layout" not in k]


async def test_lanes_on_against_lanes_off_is_refused_and_a_deleted_record_starts_afresh(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    lanes = settings.model_copy(update={**NO_QUOTAS, "queue_partitions": 1, "priority_lanes": True})
    plain = settings.model_copy(update={**NO_QUOTAS, "queue_partitions": 1})
    await check(plain)
    with pytest.raises(LayoutMismatch, match="settings give partitions=1 priority_lanes=true"):
        await check(lanes)
    # The way out the message gives: with the queue drained, delete the record.
    queue = RedisTaskQueue(connect(lanes), lanes)
    cluster = isinstance(queue.redis, redis.asyncio.RedisCluster)
    await queue.close()
    assert await redis_client.delete(Keys.from_settings(lanes, cluster=cluster).layout) == 1
    await check(lanes)
    with pytest.raises(LayoutMismatch, match="laid out as partitions=1 priority_lanes=true"):
        await check(plain)


def test_the_message_says_which_settings_gave_a_clusters_partition_count() -> None:
    quotas = Settings(submit_rate_per_key=20)  # the default (the suite turns it off)
    assert layout(quotas, cluster=True) == "partitions=1 priority_lanes=false"
    assert "per-key quotas on" in layout_reasons(quotas, cluster=True)
    free = Settings(**NO_QUOTAS)  # type: ignore[arg-type]
    assert layout(free, cluster=True) == "partitions=16 priority_lanes=false"
    assert layout_reasons(free, cluster=True) == (
        "QUEUE_PARTITIONS unset, the per-key quotas off and PRIORITY_LANES=false: 16 on a cluster"
    )
    assert layout_reasons(free, cluster=False).startswith("QUEUE_PARTITIONS unset: 1 on a single")
    lanes = Settings(priority_lanes=True, **NO_QUOTAS)  # type: ignore[arg-type]
    assert layout_reasons(lanes, cluster=True) == (
        "QUEUE_PARTITIONS unset and PRIORITY_LANES=true: 1 on a cluster"
    )
