from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fastapi_redis_mini.core.redis_queue import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[RedisTaskQueue]:
    queue = RedisTaskQueue(connect(settings), settings)
    await queue.ensure_group()
    yield queue
    await queue.close()
