"""The queue's error boundary: every way Redis refuses becomes one of the queue's own errors.

A server of the module's own is put into each state for real (OOM, READONLY, MISCONF, down);
the states that need a cluster or a long script to appear are checked on the replies redis-py
parses from the server's exact error lines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import redis
from redis._parsers.base import BaseParser

from fastapi_redis_mini.core.models import TaskCreate, request_signature
from fastapi_redis_mini.core.queue import QueueBusy, QueueState, QueueUnavailable
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect, queue_error
from fastapi_redis_mini.core.redis.queue import torn_down
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support import faults

CONSUMER = "test-consumer"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
async def queue(server: RedisServer) -> AsyncIterator[RedisTaskQueue]:
    client = server.client()
    client.flushall()
    client.close()
    settings = Settings(redis_url=server.url, log_format="text")
    queue = RedisTaskQueue(connect(settings), settings)
    await queue.ensure_group()
    yield queue
    await queue.close()


async def submit(queue: RedisTaskQueue, prompt: str = "hello") -> str:
    task = TaskCreate(prompt=prompt, params={})
    return (await queue.submit(task, signature=request_signature(task))).task_id


FAULTS = {
    QueueState.OUT_OF_MEMORY: faults.out_of_memory,
    QueueState.READ_ONLY: faults.read_only,
    QueueState.CANNOT_PERSIST: faults.cannot_persist,
}


@pytest.mark.parametrize("state", list(FAULTS), ids=lambda state: state.value)
async def test_a_server_refusing_writes_raises_busy_naming_the_state(
    queue: RedisTaskQueue, server: RedisServer, state: QueueState
) -> None:
    task_id = await submit(queue, "before")
    [delivery] = await queue.read(CONSUMER, count=10, block_ms=100)
    fault: AbstractContextManager[None] = FAULTS[state](server)
    with fault:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: submit(queue, "during"),
            queue.check_writable,
            lambda: queue.start(CONSUMER, [delivery]),
        ]
        for call in calls:
            with pytest.raises(QueueBusy) as raised:
                await call()
            assert raised.value.state is state
    await queue.check_writable()
    [job] = await queue.start(CONSUMER, [delivery])
    assert job.task_id == task_id


async def test_a_server_out_of_memory_still_serves_reads(
    queue: RedisTaskQueue, server: RedisServer
) -> None:
    task_id = await submit(queue)
    with faults.out_of_memory(server):
        record = await queue.get(task_id)
    assert record is not None
    assert record.task_id == task_id


async def test_an_unreachable_server_raises_unavailable_not_busy() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", log_format="text")
    queue = RedisTaskQueue(connect(settings), settings)
    try:
        with pytest.raises(QueueUnavailable) as raised:
            await queue.check_writable()
        assert raised.value.state is QueueState.UNREACHABLE
        assert not isinstance(raised.value, QueueBusy)
        with pytest.raises(QueueUnavailable):
            await submit(queue)
    finally:
        await queue.close()


async def test_a_programming_error_is_not_translated(
    queue: RedisTaskQueue, server: RedisServer
) -> None:
    client = server.client()
    client.set(queue.keys.stream, "not a stream")  # WRONGTYPE for every stream command
    client.close()
    with pytest.raises(redis.ResponseError) as raised:
        await queue.read(CONSUMER, count=1, block_ms=10)
    assert "WRONGTYPE" in str(raised.value)


# The exact lines servers send for the states a single test server does not easily reach.
SERVER_LINES = {
    "LOADING Redis is loading the dataset in memory": QueueState.LOADING,
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.": (
        QueueState.BUSY
    ),
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.": (
        QueueState.MASTER_DOWN
    ),
    "TRYAGAIN Multiple keys request during rehashing of slot": QueueState.TRY_AGAIN,
    "CLUSTERDOWN The cluster is down": QueueState.CLUSTER_DOWN,
    "UNBLOCKED force unblocking this client due to role change": QueueState.UNBLOCKED,
    "NOREPLICAS Not enough good replicas to write.": QueueState.NO_REPLICAS,
    "OOM command not allowed when used memory > 'maxmemory'.": QueueState.OUT_OF_MEMORY,
    "READONLY You can't write against a read only replica.": QueueState.READ_ONLY,
    "MISCONF Errors writing to the AOF file: No space left on device": (QueueState.CANNOT_PERSIST),
}


def parsed(line: str) -> redis.RedisError:
    """The exception redis-py raises for this error reply."""
    error: redis.RedisError = BaseParser.parse_error(line)  # type: ignore[no-untyped-call]
    return error


@pytest.mark.parametrize("line", list(SERVER_LINES))
def test_each_transient_server_state_is_named(line: str) -> None:
    translated = queue_error(parsed(line))
    assert isinstance(translated, QueueBusy)
    assert translated.state is SERVER_LINES[line]


@pytest.mark.parametrize(
    "line",
    [
        "ERR unknown command 'NOPE'",
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "NOSCRIPT No matching script. Please use EVAL.",
        "BUSYGROUP Consumer Group name already exists",
        "NOGROUP No such key 'task_stream' or consumer group 'workers'",
    ],
)
def test_other_server_errors_stay_defects(line: str) -> None:
    assert queue_error(parsed(line)) is None


@pytest.mark.parametrize(
    "error",
    [
        # What redis-py's cluster client raises itself while the topology changes.
        redis.exceptions.ClusterError("TTL exhausted."),
        redis.exceptions.SlotNotCoveredError('Slot "1234" is not covered by the cluster.'),
        redis.exceptions.RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one reachable node"
        ),
        redis.exceptions.RedisClusterException(
            "startup_nodes could not agree on a valid slots cache"
        ),
    ],
    ids=["ttl-exhausted", "slot-not-covered", "no-node-reachable", "nodes-disagree"],
)
def test_the_cluster_clients_own_errors_mean_the_cluster_is_down(
    error: redis.RedisError | redis.exceptions.RedisClusterException,
) -> None:
    translated = queue_error(error)
    assert translated is not None
    assert translated.state is QueueState.CLUSTER_DOWN


def test_a_pipeline_the_cluster_client_refuses_stays_a_defect() -> None:
    error = redis.exceptions.CrossSlotTransactionError("keys in more than one slot")
    assert queue_error(error) is None


async def test_a_connection_closed_under_a_call_reads_as_torn_down_not_a_defect() -> None:
    # redis-py's own connection in the state the cluster client's concurrent close leaves it
    # in: connected once, its writer gone. The call fails inside redis-py's code.
    connection = redis.asyncio.Connection(host="127.0.0.1", port=free_port())
    with pytest.raises(AttributeError) as raised:
        await connection._send_packed_command([b"PING\r\n"])
    assert torn_down(raised.value)
    # The same exception type raised by code of ours is a defect, and stays one.
    with pytest.raises(AttributeError) as ours:
        getattr(None, "writelines")  # noqa: B009 - an AttributeError raised outside redis-py
    assert not torn_down(ours.value)
    assert not torn_down(RuntimeError("Event loop is closed"))
