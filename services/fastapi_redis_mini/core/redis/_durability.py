"""The durability checks of DURABLE_ACKS: at start, and after each acknowledged write.

Owns what the setting asks of the server: whether it can give it at all (check_durable_acks,
run once at start by the entry points through exit_unless_durable_acks), the command that
waits for a write to reach the disk or a replica (durable_wait), and the verdict on that
command's reply (check_confirmed). Sending the wait along with the write is routing's
(_routing.SlotRouting._call).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..queue import QueueBusy, QueueState
from ..settings import Settings
from ._connect import connect

log = logging.getLogger(__name__)


async def check_durable_acks(settings: Settings) -> str | None:
    """At start: why the server cannot give the DURABLE_ACKS asked for, or None when it can.

    On a Redis Cluster every master is asked, since each acknowledges the writes of its slots.
    A server that cannot be reached is not judged (None, and a warning): the services start
    and wait for Redis as they always do.
    """
    if settings.durable_acks == "none":
        return None
    redis = connect(settings)
    try:
        if isinstance(redis, RedisCluster):
            await redis.initialize()
            for node in redis.get_primaries():
                problem = await _durability_problem(settings, node.execute_command, node.name)
                if problem is not None:
                    return problem
            return None
        return await _durability_problem(settings, redis.execute_command, "")
    except (RedisConnectionError, RedisTimeoutError, RedisClusterException) as error:
        log.warning("DURABLE_ACKS=%s not checked: Redis unreachable at start (%s)",
                    settings.durable_acks, error)  # fmt: skip
        return None
    finally:
        await redis.aclose()


async def _durability_problem(
    settings: Settings, execute: Callable[..., Awaitable[Any]], node: str
) -> str | None:
    """What one server (a cluster `node`, named in the answer) lacks for DURABLE_ACKS."""
    on = f" (cluster node {node})" if node else ""
    info = await execute("INFO", "server")
    version = info.get("valkey_version") and f"Valkey {info['valkey_version']}"
    version = version or f"Redis {info.get('redis_version', '?')}"
    if settings.durable_acks == "fsync":
        try:
            await execute("WAITAOF", 1, 0, 1)
        except ResponseError as error:
            if "appendonly" in str(error):
                return f"DURABLE_ACKS=fsync needs the Redis server's appendonly yes{on}"
            return (
                f"DURABLE_ACKS=fsync needs WAITAOF (Redis 7.2 or later, or Valkey); "
                f"the server is {version}{on}"
            )
        return None
    replication = await execute("INFO", "replication")
    if replication.get("role") != "master":
        return "DURABLE_ACKS=replica: REDIS_URL names a replica, which takes no writes"
    if not int(replication.get("connected_slaves", 0)):
        log.warning(
            "DURABLE_ACKS=replica but no replica is attached yet%s: submits answer 503 "
            "redis_no_replicas until one is", on
        )  # fmt: skip
    return None


def exit_unless_durable_acks(settings: Settings) -> None:
    """Entry-point helper: one line on stderr and exit 2 when DURABLE_ACKS cannot be given."""
    problem = asyncio.run(check_durable_acks(settings))
    if problem is not None:
        print(f"fastapi-redis-mini: invalid configuration: {problem}", file=sys.stderr)
        raise SystemExit(2)


def durable_wait(settings: Settings) -> tuple[str | int, ...] | None:
    """The command that follows an acknowledged write with DURABLE_ACKS, or None without."""
    wait_ms = int(settings.durable_ack_timeout * 1000)
    return {
        "none": None,
        "fsync": ("WAITAOF", 1, 0, wait_ms),
        "replica": ("WAIT", 1, wait_ms),
    }[settings.durable_acks]


def check_confirmed(settings: Settings, confirmed: Any) -> None:
    """Raise QueueBusy unless the reply of durable_wait's command confirms the write."""
    timeout = settings.durable_ack_timeout
    if settings.durable_acks == "fsync":
        if int(confirmed[0]) < 1:
            raise QueueBusy(
                QueueState.CANNOT_PERSIST,
                f"the write was not confirmed on disk within {timeout:g} s "
                "(DURABLE_ACKS=fsync, DURABLE_ACK_TIMEOUT)",
            )
    elif int(confirmed) < 1:
        raise QueueBusy(
            QueueState.NO_REPLICAS,
            f"no replica confirmed the write within {timeout:g} s "
            "(DURABLE_ACKS=replica, DURABLE_ACK_TIMEOUT)",
        )
