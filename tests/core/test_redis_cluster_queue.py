"""The queue on a real Redis Cluster (3 masters, 3 replicas): found by REDIS_CLUSTER=auto, every
key in one slot, and the task's whole life through the cluster client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
import redis
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import (
    CancelOutcome,
    Finish,
    FinishVerdict,
    Job,
    Outcome,
    QueueBusy,
    QueueState,
    StartVerdict,
    SubmitOutcome,
)
from fastapi_redis_mini.core.redis import Keys
from fastapi_redis_mini.core.redis.queue import (
    RedisTaskQueue,
    check_durable_acks,
    connect,
    is_cluster,
)
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.redis_cluster import RedisCluster as LocalCluster
from fastapi_redis_mini_harness.redis_server import RedisServer

pytestmark = pytest.mark.slow  # six server processes

CONSUMER = "cluster-consumer"


def every_key(keys: Keys) -> list[str]:
    return [
        keys.task("0" * 32),
        keys.cache("f" * 64),
        keys.cache("f" * 64, scope="tenant"),
        keys.idempotency("client-key", scope="tenant"),
        keys.submit_quota("tenant"),
        keys.unfinished("tenant"),
        keys.stream,
        keys.dead_letter,
        keys.retries,
        keys.probe,
    ]


@pytest.fixture
async def cluster_queue(redis_cluster_url: str) -> AsyncIterator[RedisTaskQueue]:
    settings = Settings(redis_url=redis_cluster_url, claim_idle=2.0, log_format="text")
    queue = RedisTaskQueue(connect(settings), settings)
    await queue.ensure_group()
    yield queue
    await queue.close()


async def submit(queue: RedisTaskQueue, prompt: str, key: str | None = None) -> tuple[str, str]:
    task = TaskCreate(prompt=prompt, params={})
    submitted = await queue.submit(task, signature=request_signature(task), idempotency_key=key)
    return submitted.task_id, submitted.outcome.value


async def take(queue: RedisTaskQueue) -> list[Job]:
    return await queue.start(CONSUMER, await queue.read(CONSUMER, count=100, block_ms=100))


def test_auto_finds_a_cluster_by_asking_the_server(
    redis_cluster_url: str, redis_server: RedisServer
) -> None:
    assert is_cluster(Settings(redis_url=redis_cluster_url))
    assert not is_cluster(Settings(redis_url=redis_server.url))
    # An explicit setting is taken as given, without asking.
    assert not is_cluster(Settings(redis_url=redis_cluster_url, redis_cluster="false"))
    assert is_cluster(Settings(redis_url="redis://127.0.0.1:1/0", redis_cluster="true"))
    # A server that does not answer at start counts as a single one.
    assert not is_cluster(Settings(redis_url="redis://127.0.0.1:1/0"))


def test_on_a_cluster_every_key_shares_one_slot_and_a_single_server_keeps_todays_names() -> None:
    settings = Settings(key_prefix="blue:")
    tagged = every_key(Keys.from_settings(settings, cluster=True))
    assert len({key_slot(key.encode()) for key in tagged}) == 1
    assert all(key.startswith("{blue:task_stream}:") for key in tagged)
    plain = Keys.from_settings(settings)
    assert every_key(plain) == [
        "blue:task:" + "0" * 32,
        "blue:cache:" + "f" * 64,
        "blue:cache:tenant:" + "f" * 64,
        "blue:idempotency:tenant:client-key",
        "blue:quota:tenant",
        "blue:unfinished:tenant",
        "blue:task_stream",
        "blue:task_stream:dead",
        "blue:task_stream:retry",
        "blue:task_stream:probe",
    ]


async def test_a_task_runs_its_whole_life_on_the_cluster(
    cluster_queue: RedisTaskQueue, redis_cluster: LocalCluster
) -> None:
    queue = cluster_queue
    assert isinstance(queue.redis, RedisCluster)
    task_id, outcome = await submit(queue, "hello")
    assert outcome == "queued"
    keyed_id, _ = await submit(queue, "keyed", key="k-1")
    assert (await submit(queue, "keyed", key="k-1")) == (keyed_id, "duplicate")
    await queue.cancel(keyed_id)
    jobs = await take(queue)
    [job] = [j for j in jobs if j.verdict is StartVerdict.RUN]
    assert (job.verdict, job.task_id) == (StartVerdict.RUN, task_id)
    running = await queue.get(task_id)
    assert running is not None
    assert running.status is TaskStatus.RUNNING
    verdicts = await queue.finish(CONSUMER, [Finish(job, Outcome.DONE, result=orjson.dumps(42))])
    assert verdicts == [FinishVerdict.WRITTEN]
    record = await queue.get(task_id)
    assert record is not None
    assert (record.status, record.result) == (TaskStatus.DONE, 42)
    cached_id, cached = await submit(queue, "hello")
    assert (cached_id, cached) == (task_id, SubmitOutcome.CACHED.value)
    stats = await queue.stats()
    assert (stats.stream_length, stats.lag, stats.pending) == (2, 0, 0)

    # The task's keys sit on the master that serves their slot.
    partition = queue.partitions.of_task(task_id)
    assert partition is not None
    slot = key_slot(partition.task(task_id).encode())
    holders = []
    for node in redis_cluster.nodes:
        client = node.client()
        try:
            if redis_cluster.roles()[node.port] == "master":
                holders += [node.port] * int(client.cluster("COUNTKEYSINSLOT", slot))
        finally:
            client.close()
    assert len(set(holders)) == 1


async def test_cancel_and_a_long_polls_wake_up_reach_across_the_cluster(
    cluster_queue: RedisTaskQueue, redis_cluster_url: str
) -> None:
    queue = cluster_queue
    pending_id, _ = await submit(queue, "cancel me")
    assert await queue.cancel(pending_id) is CancelOutcome.CANCELLED
    [skipped] = await take(queue)
    assert skipped.verdict is StartVerdict.SKIP

    # A second process's queue (the api's) hears the completion over the cluster's pub/sub.
    api = RedisTaskQueue(connect(Settings(redis_url=redis_cluster_url)), queue.settings)
    try:
        await api.open()
        task_id, _ = await submit(api, "wake me")
        [job] = await take(queue)
        async with api._completions.watch(task_id) as woken:
            await queue.finish(CONSUMER, [Finish(job, Outcome.DONE, result=b'"ok"')])
            await asyncio.wait_for(woken.wait(), timeout=10)
    finally:
        await api.close()


async def test_durable_acks_are_checked_on_every_master_of_a_cluster(
    redis_cluster_url: str, redis_cluster: LocalCluster
) -> None:
    # Every master has its replica: replica acks can be given.
    assert (
        await check_durable_acks(Settings(redis_url=redis_cluster_url, durable_acks="replica"))
        is None
    )
    # The test nodes run without appendonly, and Redis 7.0 has no WAITAOF at all: either way
    # the answer names a master.
    problem = await check_durable_acks(Settings(redis_url=redis_cluster_url, durable_acks="fsync"))
    assert problem is not None
    assert problem.startswith("DURABLE_ACKS=fsync needs ")
    assert "(cluster node 127.0.0.1:" in problem


async def warm_up(queue: RedisTaskQueue, count: int) -> None:
    """Run `count` tasks through submit, start and finish, so every master they reach has the
    scripts loaded: a first call there gets NOSCRIPT, and its WAIT is sent once more with the
    retry. Counted from a fresh cluster, that made one WAIT too many per master."""
    for n in range(count):
        await submit(queue, f"warm-up {n}")
    jobs = await take(queue)
    finishes = [Finish(job, Outcome.DONE, result=b"1") for job in jobs]
    assert await queue.finish(CONSUMER, finishes) == [FinishVerdict.WRITTEN] * count


def waits_on(cluster: LocalCluster, node_port: int) -> int:
    """How many WAIT commands a node has served."""
    node = next(node for node in cluster.nodes if node.port == node_port)
    client = node.client()
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_wait", {"calls": 0})["calls"])


def master_port(node: RedisServer) -> int | None:
    """The port of the master a node replicates, or None for a master."""
    client = node.client()
    try:
        port = client.info("replication").get("master_port")
    finally:
        client.close()
    return None if port is None else int(port)


async def test_replica_acks_wait_once_per_batch_on_the_master_serving_the_slot(
    redis_cluster_url: str, redis_cluster: LocalCluster
) -> None:
    settings = Settings(
        redis_url=redis_cluster_url, durable_acks="replica", log_format="text", queue_partitions=1
    )
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        await queue.ensure_group()
        await warm_up(queue, 1)
        master = redis_cluster.master_of(queue.keys.stream)
        before = {node.port: waits_on(redis_cluster, node.port) for node in redis_cluster.nodes}
        # 50 submits that meet in one process travel as one script call and one WAIT.
        submitted = await asyncio.gather(*(submit(queue, f"batch {n}") for n in range(50)))
        assert {outcome for _, outcome in submitted} == {"queued"}
        jobs = await take(queue)
        assert len(jobs) == 50
        finishes = [Finish(job, Outcome.DONE, result=b"1") for job in jobs]
        assert await queue.finish(CONSUMER, finishes) == [FinishVerdict.WRITTEN] * 50
        after = {node.port: waits_on(redis_cluster, node.port) for node in redis_cluster.nodes}
        served = {port: after[port] - before[port] for port in after if after[port] > before[port]}
        # The submits' batch and the finishes' batch: each one WAIT, on the slot's master.
        assert served == {master.port: 2}
    finally:
        await queue.close()


async def test_replica_acks_wait_once_per_master_for_the_partitions_it_serves(
    redis_cluster_url: str, redis_cluster: LocalCluster
) -> None:
    settings = Settings(redis_url=redis_cluster_url, durable_acks="replica", log_format="text")
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        await queue.ensure_group()
        await warm_up(queue, 50)
        for n in range(50):
            assert (await submit(queue, f"batch {n}"))[1] == "queued"
        jobs = await take(queue)
        assert len(jobs) == 50
        touched = {queue.partitions.of_task(job.task_id) for job in jobs}
        expected: dict[int, int] = {}
        for keys in touched:
            assert keys is not None
            expected[redis_cluster.master_of(keys.stream).port] = 1
        before = {node.port: waits_on(redis_cluster, node.port) for node in redis_cluster.nodes}
        finishes = [Finish(job, Outcome.DONE, result=b"1") for job in jobs]
        assert await queue.finish(CONSUMER, finishes) == [FinishVerdict.WRITTEN] * 50
        after = {node.port: waits_on(redis_cluster, node.port) for node in redis_cluster.nodes}
        served = {port: after[port] - before[port] for port in after if after[port] > before[port]}
        # One batch of outcomes: one pipeline per master, ending with one WAIT that covers
        # every partition of that master.
        assert served == expected
        assert len(served) == 3
    finally:
        await queue.close()


def prompt_in(queue: RedisTaskQueue, partition: int, tag: str) -> str:
    """A prompt whose submit (without an Idempotency-Key) goes to `partition`."""
    for n in range(100_000):
        task = TaskCreate(prompt=f"{tag} {n}", params={})
        if queue.partitions.of_submit(request_signature(task), "", None).index == partition:
            return task.prompt
    raise AssertionError("no prompt found")


async def test_replica_acks_follow_the_slot_to_its_new_master_after_a_failover(
    redis_cluster_url: str, redis_cluster: LocalCluster
) -> None:
    settings = Settings(redis_url=redis_cluster_url, durable_acks="replica", log_format="text")
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        await queue.ensure_group()
        first_id, _ = await submit(queue, "before the failover")
        partition = queue.partitions.of_task(first_id)
        assert partition is not None
        old = redis_cluster.master_of(partition.stream)
        replica = next(node for node in redis_cluster.nodes if master_port(node) == old.port)
        # A manual failover: the replica takes the slots over, the old master follows it.
        client = replica.client()
        try:
            client.execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
        finally:
            client.close()
        swapped = {replica.port: "master", old.port: "slave"}
        for _ in range(200):  # until the cluster agrees, so later tests find it settled
            roles = redis_cluster.roles()
            if {port: roles[port] for port in swapped} == swapped:
                break
            await asyncio.sleep(0.05)
        assert redis_cluster.master_of(partition.stream).port == replica.port
        redis_cluster.wait_ok()
        # The queue's slot table still names the old master, which answers MOVED: the submit
        # follows the slot, with no error, and waits on the new master. (A promoted replica
        # has no scripts loaded: the first try there meets NOSCRIPT and sends its WAIT again.)
        before = waits_on(redis_cluster, replica.port)
        second_id, outcome = await submit(queue, prompt_in(queue, partition.index, "after"))
        assert outcome == "queued"
        assert waits_on(redis_cluster, replica.port) > before
        for task_id in (first_id, second_id):
            record = await queue.get(task_id)
            assert record is not None
            assert record.status is TaskStatus.PENDING
    finally:
        await queue.close()


def test_a_standalone_client_on_a_cluster_is_what_false_gives(redis_cluster_url: str) -> None:
    client = connect(Settings(redis_url=redis_cluster_url, redis_cluster="false"))
    assert not isinstance(client, RedisCluster)
    assert isinstance(redis.ResponseError("MOVED 1 x:1"), redis.RedisError)


async def test_fsync_acks_wait_on_the_disk_of_the_master_serving_the_slot(
    redis_cluster_url: str, redis_cluster: LocalCluster
) -> None:
    if redis_cluster.kind == "redis":
        pytest.skip("DURABLE_ACKS=fsync needs WAITAOF (Redis 7.2+ or Valkey); this is Redis 7.0")
    roles = redis_cluster.roles()
    masters = [node for node in redis_cluster.nodes if roles[node.port] == "master"]
    for node in masters:
        client = node.client()
        try:
            client.config_set("appendonly", "yes")
        finally:
            client.close()
    settings = Settings(redis_url=redis_cluster_url, durable_acks="fsync", log_format="text")
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        assert await check_durable_acks(settings) is None
        on_disk = TaskCreate(prompt="on disk", params={})
        partition = queue.partitions.of_submit(request_signature(on_disk), "", None)
        master = redis_cluster.master_of(partition.stream)
        client = master.client()
        try:
            before = int(client.info("commandstats").get("cmdstat_waitaof", {"calls": 0})["calls"])
            _, outcome = await submit(queue, "on disk")
            after = int(client.info("commandstats")["cmdstat_waitaof"]["calls"])
        finally:
            client.close()
        assert outcome == "queued"
        assert after > before
    finally:
        await queue.close()
        for node in masters:
            client = node.client()
            try:
                client.config_set("appendonly", "no")
            finally:
                client.close()


async def test_replica_acks_on_a_slot_being_resharded_are_a_try_again(
    redis_cluster_url: str, redis_cluster: LocalCluster
) -> None:
    settings = Settings(redis_url=redis_cluster_url, durable_acks="replica", log_format="text")
    queue = RedisTaskQueue(connect(settings), settings)
    moving = TaskCreate(prompt="while the slot moves", params={})
    partition = queue.partitions.of_submit(request_signature(moving), "", None)
    slot = key_slot(partition.stream.encode())
    source = redis_cluster.master_of(partition.stream)
    roles = redis_cluster.roles()
    target = next(n for n in redis_cluster.nodes if roles[n.port] == "master" and n != source)
    with target.client() as client:
        target_id = client.execute_command("CLUSTER", "MYID")
    with source.client() as client:
        # The first step of moving a slot: its master answers ASK for keys it does not hold.
        client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    try:
        # A keyed submit stays in its home partition (chosen here to be the moving one; with
        # single-flight it is the request's, whatever the key).
        key = next(
            f"k{n}"
            for n in range(10_000)
            if queue.partitions.of_submit(request_signature(moving), "", f"k{n}").index
            == partition.index
        )
        with pytest.raises(QueueBusy) as refused:
            await submit(queue, "while the slot moves", key=key)
        assert refused.value.state is QueueState.TRY_AGAIN
        assert f"slot {slot} is being moved" in str(refused.value)  # ASK, not a defect
        # An unkeyed one is stored in a partition of another master instead.
        task_id, outcome = await submit(queue, "while the slot moves")
        assert outcome == "queued"
        elsewhere = queue.partitions.of_task(task_id)
        assert elsewhere is not None
        assert redis_cluster.master_of(elsewhere.stream) != source
    finally:
        with source.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        await queue.close()
    # Once the slot is stable again, the same submit goes through.
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        assert (await submit(queue, "after the slot settled"))[1] == "queued"
    finally:
        await queue.close()


async def test_the_partitions_spread_tasks_over_every_master(
    cluster_queue: RedisTaskQueue, redis_cluster: LocalCluster
) -> None:
    queue = cluster_queue
    assert len(queue.partitions) == 16  # a cluster's default
    wanted = set(range(16))
    n = 0
    while wanted:  # one task in each partition
        task = TaskCreate(prompt=f"spread {n}", params={})
        n += 1
        index = queue.partitions.of_submit(request_signature(task), "", None).index
        if index in wanted:
            wanted.discard(index)
            await queue.submit(task, signature=request_signature(task))
    tasks_per_master = []
    for node in redis_cluster.nodes:
        if redis_cluster.roles()[node.port] != "master":
            continue
        client = node.client()
        try:
            tasks_per_master.append(len(client.keys("*task:*")))
        finally:
            client.close()
    assert sorted(tasks_per_master) == [5, 5, 6]
    # A worker reads all of them, fairly, from every node in one call.
    deliveries = await queue.read(CONSUMER, count=100, block_ms=100)
    assert len({d.task_id.partition("-")[0] for d in deliveries}) == 16
    jobs = await queue.start(CONSUMER, deliveries)
    finishes = [Finish(j, Outcome.DONE, result=orjson.dumps(1)) for j in jobs]
    assert await queue.finish(CONSUMER, finishes) == [FinishVerdict.WRITTEN] * 16
    stats = await queue.stats()
    assert (stats.stream_length, stats.lag, stats.pending, len(stats.partitions)) == (16, 0, 0, 16)
    assert await queue.trim() >= 0
    await queue.leave(CONSUMER)


async def test_a_master_that_lost_the_scripts_reruns_only_its_own_calls(
    cluster_queue: RedisTaskQueue, redis_cluster: LocalCluster
) -> None:
    queue = cluster_queue
    for n in range(40):
        task = TaskCreate(prompt=f"flushed {n}", params={})
        await queue.submit(task, signature=request_signature(task))
    first = await queue.read(CONSUMER, count=20, block_ms=100)
    assert [j.verdict for j in await queue.start(CONSUMER, first)] == [StartVerdict.RUN] * 20
    deliveries = await queue.read(CONSUMER, count=100, block_ms=100)
    assert len(deliveries) == 20
    # One master lost its scripts (a restart, or a replica just promoted); the others have them.
    [master, *_] = [n for n in redis_cluster.nodes if redis_cluster.roles()[n.port] == "master"]
    client = master.client()
    try:
        client.script_flush()
    finally:
        client.close()
    jobs = await queue.start(CONSUMER, deliveries)
    # Run twice, a start would find its own tasks running and call them suspects.
    assert [j.verdict for j in jobs] == [StartVerdict.RUN] * 20


async def test_a_new_queues_first_burst_reaches_every_partition_at_once(
    redis_cluster_url: str,
) -> None:
    # No call before the burst: the client learns the slots during it.
    settings = Settings(redis_url=redis_cluster_url, log_format="text")
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        tasks = [TaskCreate(prompt=f"burst {n}", params={}) for n in range(200)]
        submitted = await asyncio.gather(
            *(queue.submit(t, signature=request_signature(t)) for t in tasks)
        )
        assert {s.outcome for s in submitted} == {SubmitOutcome.QUEUED}
        assert len({s.task_id.partition("-")[0] for s in submitted}) == 16
    finally:
        await queue.close()
