"""DURABLE_ACKS: what a 202 survives when Redis is SIGKILLed right after it, per mode."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from fastapi_redis_mini_harness.processes import service_env
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support.http import client_per_thread
from ._chaos import collect, wait_until
from .conftest import Launcher

pytestmark = pytest.mark.slow

SUBMITS = 200


def waitaof_or_skip(server: RedisServer) -> None:
    """WAITAOF arrived in Redis 7.2; Valkey has it. Debian's Redis 7.0 does not."""
    with server.client() as client:
        version = str(client.info("server")["redis_version"])
    if server.kind == "redis" and tuple(int(p) for p in version.split(".")[:2]) < (7, 2):
        reason = f"DURABLE_ACKS=fsync needs WAITAOF (Redis 7.2+ or Valkey); this is Redis {version}"
        print(f"\nreliability[durable-acks]: skipped: {reason}")
        pytest.skip(reason)


def submit_many(base_url: str, count: int, label: str) -> tuple[list[str], dict[int, int]]:
    """Submit `count` distinct tasks, 16 at a time; the ids of the 202s and every status seen."""
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=base_url, timeout=20) as client:

        def one(n: int) -> httpx.Response:
            return own().post("/tasks", json={"prompt": f"{label} {n}"})

        with client_per_thread(client) as own, ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(count)))
    for answer in answers:
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
    return [a.json()["task_id"] for a in answers if a.status_code == 202], statuses


def stored(client: redis.Redis, task_ids: list[str]) -> tuple[int, int]:
    """How many of the tasks have their hash, and how many have a stream entry."""
    hashes = sum(client.exists(f"task:{task_id}") for task_id in task_ids)
    entries: list[tuple[str, dict[str, str]]] = client.xrange("task_stream")  # type: ignore[assignment]
    in_stream = {fields["task_id"] for _, fields in entries}
    return hashes, len(in_stream & set(task_ids))


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    # everysec, the chart's default: the fsync mode must not depend on appendfsync always.
    server = RedisServer(appendonly=True, appendfsync="everysec")
    server.start()
    yield server
    server.close()


def test_fsync_every_202_and_every_done_survive_a_sigkill_of_redis(
    aof_server: RedisServer, launch: Launcher
) -> None:
    waitaof_or_skip(aof_server)
    api = launch.api(aof_server.url, DURABLE_ACKS="fsync", WEB_CONCURRENCY="2")
    accepted, statuses = submit_many(api.base_url, SUBMITS, "fsync")
    with aof_server.client() as client:
        waits = client.info("commandstats")["cmdstat_waitaof"]["calls"]
    aof_server.stop(kill=True)  # right after the last 202
    aof_server.start()
    with aof_server.client() as client:
        hashes, entries = stored(client, accepted)

    # Then the worker's side: every DONE it reported survives the next SIGKILL.
    worker = launch.worker(aof_server.url, DURABLE_ACKS="fsync", MAX_CONCURRENCY="50")
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        tasks = collect(client, accepted, timeout=60)
    done = [task_id for task_id, task in tasks.items() if task["status"] == "DONE"]
    aof_server.stop(kill=True)
    aof_server.start()
    with aof_server.client() as client:
        still_done = sum(client.hget(f"task:{task_id}", "status") == "DONE" for task_id in done)
    print(
        f"\nreliability[durable-acks-fsync]: answers={statuses} accepted={len(accepted)} "
        f"waitaof_calls={waits} after_kill: hashes={hashes} stream_entries={entries} "
        f"done={len(done)} done_after_kill={still_done}"
    )
    assert statuses == {202: SUBMITS}
    # Group commit: one WAITAOF per batch of submits, not one per request.
    assert 0 < waits < SUBMITS
    assert (hashes, entries) == (len(accepted), len(accepted))
    assert len(done) == len(accepted)
    assert still_done == len(done)
    assert worker.process.poll() is None


def test_none_records_what_a_sigkill_of_redis_loses(
    aof_server: RedisServer, launch: Launcher
) -> None:
    # No assertion on the loss: without DURABLE_ACKS, what survives depends on the disk and
    # the timing. A process kill keeps what Redis wrote to the kernel; see docs/reliability.md.
    api = launch.api(aof_server.url, DURABLE_ACKS="none", WEB_CONCURRENCY="2")
    accepted, statuses = submit_many(api.base_url, SUBMITS, "none")
    aof_server.stop(kill=True)
    aof_server.start()
    with aof_server.client() as client:
        hashes, entries = stored(client, accepted)
    print(
        f"\nreliability[durable-acks-none]: answers={statuses} accepted={len(accepted)} "
        f"after_kill: hashes={hashes} stream_entries={entries} lost={len(accepted) - hashes}"
    )


class Pair:
    """A primary and its replica on loopback, each with its own port and data directory."""

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer()

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        with self.replica.client() as client:
            client.replicaof("127.0.0.1", self.primary.port)
        with self.primary.client() as client:
            linked = wait_until(
                lambda: (
                    client.info("replication")["connected_slaves"] >= 1
                    and client.info("replication").get("slave0", {}).get("state") == "online"
                ),
                20,
            )
        assert linked, "the replica did not come online"

    def close(self) -> None:
        self.primary.close()
        self.replica.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    servers = Pair()
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


def test_replica_every_202_survives_losing_the_primary(pair: Pair, launch: Launcher) -> None:
    api = launch.api(pair.primary.url, DURABLE_ACKS="replica", WEB_CONCURRENCY="2")
    accepted, statuses = submit_many(api.base_url, SUBMITS, "replica")
    # A cancel's 202 is an acknowledgement too.
    cancelled = httpx.delete(f"{api.base_url}/tasks/{accepted[0]}", timeout=20)
    pair.primary.stop(kill=True)  # right after the last 202, gone for good
    with pair.replica.client() as client:
        client.replicaof("NO", "ONE")
        hashes, entries = stored(client, accepted)
    # The service, pointed at the promoted replica, has every accepted task and runs it.
    promoted = launch.api(pair.replica.url)
    launch.worker(pair.replica.url, MAX_CONCURRENCY="50")
    with httpx.Client(base_url=promoted.base_url, timeout=30) as client:
        tasks = collect(client, accepted, timeout=60)
    done = sum(task["status"] == "DONE" for task in tasks.values())
    print(
        f"\nreliability[durable-acks-replica]: answers={statuses} accepted={len(accepted)} "
        f"on_promoted_replica: hashes={hashes} stream_entries={entries} done={done} "
        f"cancelled={tasks[accepted[0]]['status']}"
    )
    assert statuses == {202: SUBMITS}
    assert cancelled.status_code == 202
    assert (hashes, entries) == (len(accepted), len(accepted))
    assert tasks[accepted[0]]["status"] == "CANCELLED"
    assert done == len(accepted) - 1


def test_replica_without_a_replica_answers_503_after_the_timeout(launch: Launcher) -> None:
    server = RedisServer()
    server.start()
    try:
        api = launch.api(server.url, DURABLE_ACKS="replica", DURABLE_ACK_TIMEOUT="0.5")
        with httpx.Client(base_url=api.base_url, timeout=20) as client:
            asked = time.monotonic()
            answer = client.post("/tasks", json={"prompt": "nobody to copy it"})
            seconds = time.monotonic() - asked
    finally:
        server.close()
    print(
        f"\nreliability[durable-acks-no-replica]: status={answer.status_code} "
        f"after_s={seconds:.2f} body={answer.text}"
    )
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "redis_no_replicas"
    assert answer.headers["retry-after"]
    assert 0.5 <= seconds < 5
    assert "Traceback" not in api.log


@pytest.mark.parametrize("module", ["fastapi_redis_mini.api", "fastapi_redis_mini.worker"])
def test_fsync_against_a_server_without_appendonly_stops_at_start_with_one_line(
    module: str, redis_url: str
) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", module],
        env={**service_env(redis_url), "DURABLE_ACKS": "fsync"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = completed.stderr.strip().splitlines()
    print(f"\nreliability[durable-acks-start]: {module} exit={completed.returncode} {lines}")
    assert completed.returncode == 2
    assert len(lines) == 1, completed.stderr
    # Debian's Redis 7.0 has no WAITAOF at all; Valkey has it but refuses it without AOF.
    assert "DURABLE_ACKS=fsync needs" in lines[0]
    assert "Traceback" not in completed.stderr
