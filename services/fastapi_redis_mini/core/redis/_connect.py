"""Connecting: the client type, cluster detection, and the one pooled client per process.

Owns `Client` (a single server's client or a Redis Cluster's), is_cluster() (REDIS_CLUSTER,
or the server's own INFO cluster with "auto") and connect() with its connection options and
the connection classes of _packing.py.
"""

from __future__ import annotations

import logging
from typing import Any, TypeAlias

import redis as sync_redis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..settings import Settings
from ._packing import packed

log = logging.getLogger(__name__)

# A single server's client, or a Redis Cluster's (REDIS_CLUSTER).
Client: TypeAlias = Redis | RedisCluster


def is_cluster(settings: Settings) -> bool:
    """Whether REDIS_URL is a Redis Cluster: REDIS_CLUSTER, or with "auto" the server's own
    INFO cluster, asked once at start (a server that does not answer counts as a single one)."""
    if settings.redis_cluster != "auto":
        return settings.redis_cluster == "true"
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    probe = sync_redis.Redis.from_url(
        settings.redis_url, password=password, socket_connect_timeout=5, socket_timeout=5
    )
    try:
        return bool(int(probe.info("cluster").get("cluster_enabled", 0)))
    except sync_redis.RedisError as error:
        # Info, not a warning: the services go on to wait for Redis and say so themselves.
        log.info("REDIS_CLUSTER=auto: Redis unreachable at start (%s); using a single "
                 "server's client", error)  # fmt: skip
        return False
    finally:
        probe.close()


def connect(settings: Settings) -> Client:
    """One pooled client per process; commands are retried briefly on a dropped connection.

    The pool blocks (up to 5 s) when all REDIS_MAX_CONNECTIONS are busy instead of failing, so
    a burst of requests queues for a connection rather than erroring. On a Redis Cluster the
    cluster client finds every node from the one REDIS_URL names, and follows MOVED and ASK.
    """
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    options: dict[str, Any] = {
        "max_connections": settings.redis_max_connections,
        "password": password,
        "decode_responses": True,
        # A connect to a node across a cut link waits for this; on a cluster the client tries
        # the node again after reading the slots, so it counts twice or more per command. A
        # reachable server, even a frozen one, completes the handshake in the kernel at once.
        "socket_connect_timeout": settings.redis_socket_timeout,
        "socket_timeout": settings.redis_socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=1),
    }
    if is_cluster(settings):
        cluster = RedisCluster.from_url(settings.redis_url, **options)
        # Before any connection is made: the nodes found later are made with these kwargs
        # (the nodes manager holds the same dict), the one REDIS_URL names already exists.
        kwargs = cluster.connection_kwargs
        kwargs["connection_class"] = packed(kwargs["connection_class"])
        for node in cluster.startup_nodes:
            node.connection_class = packed(node.connection_class)
        return cluster
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        timeout=5,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **options,
    )
    pool.connection_class = packed(pool.connection_class)  # TCP, TLS or a Unix socket
    return Redis.from_pool(pool)
