"""The service's connections pack commands in C, into exactly the bytes redis-py's packer makes.

Each expectation is redis-py's own asyncio packer run on the same arguments, so a difference
in any argument kind (text, bytes, numbers, a two-word command) fails here. The clients
connect() makes are checked to use those connections, for every kind of REDIS_URL, and a
real round trip through them stores what was sent.
"""

from __future__ import annotations

import pytest
import redis.asyncio
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import DataError

from fastapi_redis_mini.core.redis import connect
from fastapi_redis_mini.core.redis._packing import (
    PackedConnection,
    PackedSSLConnection,
    PackedUnixConnection,
)
from fastapi_redis_mini.core.settings import Settings

from ..conftest import redis_backend_name

ARGUMENTS = [
    ("SET", "key", "value"),
    ("SET", "clé", "värde ✓"),
    ("SET", b"raw", b"\xff\x00\r\n"),
    ("ZADD", "z", 0.1, "a", 1e20, "b", -7, "c", 3.0, "d"),
    ("SET", "n", 2**62),
    ("SET", "view", memoryview(b"from a view")),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", b"name"),
    ("EVALSHA", "a" * 40, 3, "{q}:task:1", "{q}:task:2", "{q}:task:3", "x" * 10_000),
    ("XADD", "s", "*", *[f"field-{i}" for i in range(3_000)]),
]


@pytest.mark.parametrize("args", ARGUMENTS, ids=lambda args: str(args[0])[:12])
def test_a_packed_command_is_byte_for_byte_what_redis_py_packs(args: tuple[object, ...]) -> None:
    expected = b"".join(bytes(chunk) for chunk in Connection().pack_command(*args))  # type: ignore[arg-type]
    assert b"".join(PackedConnection().pack_command(*args)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, True, object()], ids=["None", "bool", "object"])
def test_an_argument_redis_py_refuses_is_refused_with_its_error(bad: object) -> None:
    with pytest.raises(DataError) as python:
        Connection().pack_command("SET", "key", bad)  # type: ignore[arg-type]
    with pytest.raises(DataError) as packed:
        PackedConnection().pack_command("SET", "key", bad)  # type: ignore[arg-type]
    assert str(packed.value) == str(python.value)


@pytest.mark.parametrize(
    ("url", "plain", "expected"),
    [
        ("redis://127.0.0.1:1/0", Connection, PackedConnection),
        ("rediss://127.0.0.1:1/0", SSLConnection, PackedSSLConnection),
        ("unix:///nonexistent/redis.sock", UnixDomainSocketConnection, PackedUnixConnection),
    ],
)
async def test_a_single_servers_client_uses_the_packed_class_of_its_urls_kind(
    url: str, plain: type[AbstractConnection], expected: type[AbstractConnection]
) -> None:
    client = connect(Settings(redis_url=url, redis_cluster="false"))
    try:
        assert isinstance(client, redis.asyncio.Redis)
        connection_class = client.connection_pool.connection_class
        assert connection_class is expected
        assert issubclass(connection_class, plain)  # TLS and socket options are kept
    finally:
        await client.aclose()


async def test_a_round_trip_through_the_services_client_stores_what_was_sent(
    settings: Settings,
) -> None:
    client = connect(settings)
    try:
        value = "värde ✓ " + "x" * 10_000
        await client.set("{t}:packed", value)
        await client.zadd("{t}:scores", {"a": 0.1, "b": 1e20})
        assert await client.get("{t}:packed") == value
        assert await client.zscore("{t}:scores", "a") == 0.1
        assert await client.zscore("{t}:scores", "b") == 1e20
        if redis_backend_name() == "cluster":
            assert isinstance(client, redis.asyncio.RedisCluster)
            nodes = client.get_nodes()
            assert nodes
            assert {node.connection_class for node in nodes} == {PackedConnection}
        else:
            assert isinstance(client, redis.asyncio.Redis)
            assert client.connection_pool.connection_class is PackedConnection
    finally:
        await client.aclose()
