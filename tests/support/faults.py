"""Put a real server into a state in which it refuses writes, and take it out again.

Each fault is what an operator meets in production, made on purpose: the memory limit reached
under noeviction (OOM), a primary demoted to a replica (READONLY), a background save that
fails under stop-writes-on-bgsave-error (MISCONF).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.redis_server import RedisServer


@contextmanager
def out_of_memory(server: RedisServer) -> Iterator[None]:
    """OOM: maxmemory below what is used, under the noeviction policy the chart sets."""
    client = server.client()
    client.config_set("maxmemory", 1)
    try:
        yield
    finally:
        client.config_set("maxmemory", 0)
        client.close()


@contextmanager
def read_only(server: RedisServer) -> Iterator[None]:
    """READONLY: a replica of a primary that is not there, then a primary again.

    A replica keeps its data until it syncs, and this one never reaches a primary to sync with.
    """
    client = server.client()
    client.replicaof("127.0.0.1", str(free_port()))
    try:
        yield
    finally:
        client.replicaof("NO", "ONE")
        client.close()


@contextmanager
def cannot_persist(server: RedisServer, timeout: float = 10.0) -> Iterator[None]:
    """MISCONF: the last background save failed while stop-writes-on-bgsave-error is on.

    The save fails at its last step: a directory stands where the snapshot is renamed to (root
    ignores file modes, so an unwritable directory would not make it fail). The server refuses
    writes only while it has save points, so one is set for the duration.
    """
    client = server.client()
    snapshot = server.data_dir / str(client.config_get("dbfilename")["dbfilename"])
    saves = str(client.config_get("save")["save"])
    client.config_set("stop-writes-on-bgsave-error", "yes")
    client.config_set("save", "3600 1")
    snapshot.mkdir()
    try:
        _bgsave(server, expect="err", timeout=timeout)
        yield
    finally:
        snapshot.rmdir()
        _bgsave(server, expect="ok", timeout=timeout)
        client.config_set("save", saves)
        client.close()


def _bgsave(server: RedisServer, *, expect: str, timeout: float) -> None:
    client = server.client()
    try:
        deadline = time.monotonic() + timeout
        while True:
            persistence = client.info("persistence")
            if not persistence["rdb_bgsave_in_progress"]:
                break
            assert time.monotonic() < deadline, "a background save is still running"
            time.sleep(0.05)
        client.bgsave()
        while True:
            persistence = client.info("persistence")
            if (
                not persistence["rdb_bgsave_in_progress"]
                and persistence["rdb_last_bgsave_status"] == expect
            ):
                return
            assert time.monotonic() < deadline, f"the background save did not end {expect!r}"
            time.sleep(0.05)
    finally:
        client.close()
