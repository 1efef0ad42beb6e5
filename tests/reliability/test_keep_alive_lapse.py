"""A worker whose keep-alive lapses (Redis unreachable for longer than CLAIM_IDLE) while it
still holds a running task must not reclaim that entry from itself and run the task again.

In-process, so the lapse can be made exact: only the keep-alive calls fail, for a set time.
Over real processes (a 3 s Redis outage, CLAIM_IDLE=1) the same rerun showed up in roughly
half the runs, depending on whether the keep-alive or the reclaim reached Redis first.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import Job, QueueState, QueueUnavailable
from fastapi_redis_mini.core.redis import Client, RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker.runner import Worker


class LapsingKeepAlive(RedisTaskQueue):
    """The real queue, except that keep-alive calls fail until `lapse_until` (monotonic)."""

    def __init__(self, redis: Client, settings: Settings, lapse_seconds: float) -> None:
        super().__init__(redis, settings)
        self.lapse_until = time.monotonic() + lapse_seconds

    async def keep_alive(self, consumer: str, jobs: Sequence[Job]) -> list[str]:
        if time.monotonic() < self.lapse_until:
            raise QueueUnavailable(QueueState.UNREACHABLE, "keep-alive lapse injected by the test")
        return await super().keep_alive(consumer, jobs)


class CountingHandler:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        self.calls[prompt] += 1
        await asyncio.sleep(float(params["duration"]))
        return {"calls": self.calls[prompt]}


async def test_a_lapsed_keep_alive_does_not_make_a_worker_rerun_its_own_task(
    settings: Settings,
) -> None:
    configured = settings.model_copy(update={"claim_idle": 1.0, "max_concurrency": 4})
    client = RedisTaskQueue(connect(configured), configured)
    await client.ensure_group()
    handler = CountingHandler()
    # The lapse outlasts CLAIM_IDLE (1 s) but not the task (4 s).
    queue = LapsingKeepAlive(connect(configured), configured, lapse_seconds=2.5)
    worker = Worker(queue, handler, configured)
    running = asyncio.create_task(worker.run())
    try:
        task = TaskCreate(prompt="held", params={"duration": 4.0})
        task_id = (await client.submit(task, signature=request_signature(task))).task_id
        record = await client.wait(task_id, "", 15)
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(running, 20)
        finally:
            await queue.close()
            await client.close()

    assert record is not None
    print(
        f"\nreliability[keep-alive-lapse]: status={record.status} attempts={record.attempts} "
        f"handler_calls={handler.calls['held']}"
    )
    assert record.status is TaskStatus.DONE
    # Nobody else was there to take the task: one run, one attempt.
    assert handler.calls["held"] == 1
    assert record.attempts == 1
