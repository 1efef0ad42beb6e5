"""A partition that cannot take outcomes holds up no other: a worker in-process on a real
Redis Cluster of its own (3 masters, 3 replicas), DURABLE_ACKS=replica.

One master's replica is frozen (SIGSTOP), so that master cannot confirm a write: its
partitions refuse outcomes (WAIT finds no replica) while the other masters' take them. The
worker must finish the healthy partitions' tasks meanwhile, stop reading from the refusing
ones, log each refusing partition once (not once per retry), show it in
`partition_writable`, and write everything once the replica is back.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY

from fastapi_redis_mini.core.handlers import SimulatedInference
from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker._http import build_app
from fastapi_redis_mini.worker.runner import Worker
from fastapi_redis_mini_harness.polling import poll_async
from fastapi_redis_mini_harness.redis_cluster import RedisCluster
from fastapi_redis_mini_harness.redis_server import RedisServer

pytestmark = pytest.mark.slow

TASKS = 80


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    """A cluster of its own: the test freezes one of its replicas."""
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def settings(cluster: RedisCluster) -> Settings:
    return Settings(
        redis_url=cluster.url,
        redis_cluster="true",
        durable_acks="replica",
        durable_ack_timeout=0.3,
        claim_idle=30.0,
        shutdown_grace=5.0,
        log_format="text",
    )


def _replica_of(cluster: RedisCluster, master: RedisServer) -> RedisServer:
    for node in cluster.nodes:
        client = node.client()
        try:
            if int(str(client.info("replication").get("master_port", 0))) == master.port:
                return node
        finally:
            client.close()
    raise AssertionError(f"no replica of {master.port}")


def _writable(partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "fastapi_redis_mini_partition_writable", {"partition": str(partition)}
    )


async def _statuses(queue: RedisTaskQueue, task_ids: list[str]) -> dict[str, TaskStatus]:
    tasks = await asyncio.gather(*(queue.get(task_id) for task_id in task_ids))
    return {t.task_id: t.status for t in tasks if t is not None}


async def test_a_partition_without_a_replica_holds_up_no_other_partition(
    cluster: RedisCluster,
    settings: Settings,
    queue: RedisTaskQueue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = []
    for n in range(TASKS):
        task = TaskCreate(prompt=f"isolated {n}", params={"duration": 0.05})
        ids.append((await queue.submit(task, signature=request_signature(task))).task_id)
    master = cluster.master_of(queue.partitions.all[0].stream)
    bad = {
        keys.index
        for keys in queue.partitions.all
        if cluster.master_of(keys.stream).port == master.port
    }
    in_bad = [i for i in ids if queue.partition_of(i) in bad]
    in_good = [i for i in ids if queue.partition_of(i) not in bad]
    assert in_bad
    assert in_good
    replica = _replica_of(cluster, master)
    assert replica.process is not None
    frozen = replica.process
    frozen.send_signal(signal.SIGSTOP)
    worker = Worker(
        RedisTaskQueue(connect(settings), settings),
        SimulatedInference(5),
        settings.model_copy(update={"max_concurrency": 8}),
    )
    running = asyncio.create_task(worker.run())
    try:
        caplog.set_level(logging.INFO, logger="fastapi_redis_mini.worker._outbox")

        async def healthy_done() -> bool:
            statuses = await _statuses(queue, in_good)
            return list(statuses.values()).count(TaskStatus.DONE) == len(in_good)

        began = time.monotonic()
        await poll_async(healthy_done, 60, 0.2, "the healthy partitions' tasks never finished")
        healthy_seconds = time.monotonic() - began

        # Submitted while the master cannot confirm: stored on the other masters.
        later = []
        for n in range(20):
            task = TaskCreate(prompt=f"later {n}", params={"duration": 0.05})
            later.append((await queue.submit(task, signature=request_signature(task))).task_id)
        assert not {queue.partition_of(i) for i in later} & bad

        async def later_done() -> bool:
            statuses = await _statuses(queue, later)
            return list(statuses.values()).count(TaskStatus.DONE) == len(later)

        await poll_async(later_done, 30, 0.2, "tasks submitted during the refusal never finished")
        await asyncio.sleep(3.0)  # several retries of the refusing partitions' outcomes
        refusing = worker.refusing_partitions()
        waiting = await _statuses(queue, in_bad)
        assert refusing
        assert refusing <= bad, (refusing, bad)
        assert all(_writable(i) == 0 for i in refusing)
        assert all(_writable(i) == 1 for i in range(len(queue.partitions)) if i not in bad)
        # Nothing more is read from a refusing partition: at most what the worker could hold
        # (MAX_CONCURRENCY x 2) was taken before its first refusal, the rest still waits.
        taken = len(in_bad) - list(waiting.values()).count(TaskStatus.PENDING)
        assert taken <= 16, waiting
        # The worker stays ready, and says which partitions refuse what.
        transport = httpx.ASGITransport(app=build_app(worker, queue, settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
            ready = await client.get("/readyz")
            detail = (await client.get("/healthz", params={"detail": "true"})).json()
        assert ready.status_code == 200
        assert detail["redis"] == "partitions_unavailable"
        assert set(detail["partitions"]) == {str(i) for i in bad}
        assert set(detail["partitions"].values()) == {"no_replicas"}
        assert detail["refusing_outcomes"] == sorted(refusing)
    finally:
        frozen.send_signal(signal.SIGCONT)

    async def all_done() -> bool:
        statuses = await _statuses(queue, ids + later)
        return list(statuses.values()).count(TaskStatus.DONE) == len(ids) + len(later)

    try:
        await poll_async(all_done, 60, 0.2, "the refusing partitions' tasks never finished")
    finally:
        worker.stop()
        await asyncio.wait_for(running, 20)
        assert isinstance(worker.queue, RedisTaskQueue)
        await worker.queue.close()
    assert worker.refusing_partitions() == frozenset()
    assert all(_writable(i) == 1 for i in range(len(queue.partitions)))
    messages = [r.getMessage() for r in caplog.records]
    for index in refusing:
        assert sum(f"partition {index} cannot take" in m for m in messages) == 1, messages
        assert sum(f"partition {index} takes outcomes again" in m for m in messages) == 1
    print(
        f"\npartition isolation: {len(in_good)} healthy tasks DONE in {healthy_seconds:.1f}s "
        f"while partitions {sorted(refusing)} refused; {len(later)} submitted meanwhile, "
        f"all on other masters and DONE; {len(in_bad)} waiting tasks DONE once the replica was back"
    )
