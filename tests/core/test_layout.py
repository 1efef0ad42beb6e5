"""The queue's layout (partitions, lanes) is recorded by every process that starts, and a
process whose layout differs from the one recorded before it is told so, naming both and the
settings behind its own: processes of two layouts use different keys, and the tasks one side
submits the other never runs."""

from __future__ import annotations

import redis.asyncio

from fastapi_redis_mini.core.redis import Keys, RedisTaskQueue, connect
from fastapi_redis_mini.core.redis.keys import layout, layout_reasons
from fastapi_redis_mini.core.settings import Settings

NO_QUOTAS = {"submit_rate_per_key": 0, "max_unfinished_per_key": 0, "max_stored_bytes_per_key": 0}


async def record(settings: Settings) -> tuple[str | None, str]:
    """What recording `settings`' layout says, and the key it is recorded in."""
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        cluster = isinstance(queue.redis, redis.asyncio.RedisCluster)
        return await queue.record_layout(), Keys.from_settings(settings, cluster=cluster).layout
    finally:
        await queue.close()


async def test_the_first_process_records_its_layout_and_the_same_one_says_nothing(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    warning, key = await record(settings)
    assert warning is None
    # The suite runs without quotas: a cluster's default is 16 partitions, a server's 1.
    cluster = key.startswith("{")
    assert await redis_client.get(key) == f"partitions={16 if cluster else 1} priority_lanes=false"
    assert await record(settings) == (None, key)


async def test_another_partition_count_is_told_with_both_layouts_and_its_setting(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    one = settings.model_copy(update={**NO_QUOTAS, "queue_partitions": 1})
    four = settings.model_copy(update={**NO_QUOTAS, "queue_partitions": 4})
    assert (await record(one))[0] is None
    warning, key = await record(four)
    assert warning is not None
    assert "was last used laid out as partitions=1 priority_lanes=false" in warning
    assert "lays it out as partitions=4 priority_lanes=false (QUEUE_PARTITIONS=4;" in warning
    assert key in warning
    # The last to start is recorded: the next process of its layout is not warned again, and
    # one of the first layout is.
    assert await redis_client.get(key) == "partitions=4 priority_lanes=false"
    assert (await record(four))[0] is None
    back, _ = await record(one)
    assert back is not None
    assert "was last used laid out as partitions=4" in back


async def test_lanes_on_against_lanes_off_is_told(settings: Settings) -> None:
    lanes = settings.model_copy(update={**NO_QUOTAS, "queue_partitions": 1, "priority_lanes": True})
    plain = settings.model_copy(update={**NO_QUOTAS, "queue_partitions": 1})
    assert (await record(plain))[0] is None
    warning, _ = await record(lanes)
    assert warning is not None
    assert "lays it out as partitions=1 priority_lanes=true" in warning


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
