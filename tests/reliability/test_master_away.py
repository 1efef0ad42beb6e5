"""A Redis Cluster master SIGKILLed and kept away, as a node being replaced is.

Real processes: a 6-node cluster (3 masters, 3 replicas), the api and two workers with
REDIS_CLUSTER=true and DURABLE_ACKS=replica, and clients submitting unkeyed tasks throughout.
The busiest master is killed and stays away for AWAY_SECONDS. Its replica takes over, but has
no replica of its own, so its partitions cannot confirm a write until the killed node comes
back as that replica. Meanwhile two things must hold, and both are tested: availability (the
other masters' partitions keep taking submits and finishing tasks; unkeyed submits of the
stranded partitions are stored on other masters, so at least 95% of the submits made while
the master is away answer 202) and durability (every accepted task is DONE in the end).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fastapi_redis_mini.core.redis.keys import Partitions
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_cluster import RedisCluster
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support.http import client_per_thread
from ._chaos import Load, Tally, collect, metric, scrape
from .test_cluster_failover import keys_per_master, master_port, role

# Serial: its figures (the 202 share, tasks finished within FINISH_WITHIN) are about the
# service, and two workers and two clients on a shared 2-core machine would measure the
# neighbours as well.
pytestmark = [pytest.mark.slow, pytest.mark.serial]

AWAY_SECONDS = 30.0
# Submits made within this long after the kill may meet the cluster while it fails over
# (CLUSTERDOWN everywhere until the replica is promoted); they count in the 202 share anyway.
TARGET_ACCEPTED_SHARE = 0.95
# A task accepted this long before the node comes back has had time to finish, unless its
# partition was held up by the stranded one.
FINISH_WITHIN = 5.0
DURABLE = {"REDIS_CLUSTER": "true", "DURABLE_ACKS": "replica"}


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    """A cluster of its own: this test kills one of its nodes."""
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _notable(log: str) -> str:
    lines = [line for line in log.splitlines() if "task finished" not in line]
    return "\n".join(lines[-60:])


def _statuses(client: httpx.Client, task_ids: list[str]) -> Counter[str]:
    def status(task_id: str) -> str:
        response = own().get(f"/tasks/{task_id}")
        return str(response.json()["status"]) if response.status_code == 200 else "UNKNOWN"

    with client_per_thread(client) as own, ThreadPoolExecutor(8) as pool:
        return Counter(pool.map(status, task_ids))


def test_a_master_away_for_30s_stops_neither_the_healthy_partitions_nor_unkeyed_submits(
    cluster: RedisCluster,
) -> None:
    services: list[Process] = []
    loads: list[Load] = []
    try:
        # All three start at once: on two cores their imports overlap instead of queueing.
        api = start_api(cluster.url, DURABLE, wait=False)
        services.append(api)
        workers = [
            start_worker(cluster.url, DURABLE, name=f"worker-{n}", wait=False) for n in range(2)
        ]
        services += workers
        api.wait_until_answers("/readyz")
        for worker in workers:
            worker.wait_until_answers("/healthz")
        loads = [Load(api.base_url, limit=20_000, label=f"away-{n}") for n in range(2)]
        for load in loads:
            load.start()
        poll(lambda: sum(len(x.accepted) for x in loads) >= 100, 60, what="100 submits accepted")
        sizes = keys_per_master(cluster)
        doomed: RedisServer = max(sizes, key=lambda node: sizes[node])
        replica = next(node for node in cluster.nodes if master_port(node) == doomed.port)
        partitions = Partitions.from_settings(Settings(), cluster=True).all
        stranded = {k.index for k in partitions if cluster.master_of(k.stream).port == doomed.port}

        answered_at_kill = [len(x.answers) for x in loads]
        accepted_at_kill = [len(x.accepted) for x in loads]
        killed_at = time.monotonic()
        doomed.stop(kill=True)
        poll(lambda: role(replica) == "master", 60, what="the replica taking over")
        failover_seconds = time.monotonic() - killed_at
        accepted_at_failover = [len(x.accepted) for x in loads]
        time.sleep(max(0.0, AWAY_SECONDS - FINISH_WITHIN - (time.monotonic() - killed_at)))
        # Accepted while the promoted master had no replica, long enough ago to have finished.
        # (During the failover itself every partition answers CLUSTERDOWN for a moment, and a
        # start whose reply was lost then is reclaimed only after CLAIM_IDLE.)
        settled = [x.accepted[at:] for x, at in zip(loads, accepted_at_failover, strict=True)]
        during_failover = [
            t
            for x, start, end in zip(loads, accepted_at_kill, accepted_at_failover, strict=True)
            for t in x.accepted[start:end]
        ]
        time.sleep(max(0.0, AWAY_SECONDS - (time.monotonic() - killed_at)))
        with httpx.Client(base_url=api.base_url, timeout=15) as client:
            while_away = _statuses(client, [t for ids in settled for t in ids])
            of_failover = _statuses(client, during_failover)
        answered_at_return = [len(x.answers) for x in loads]
        writable = [metric(scrape(w), "fastapi_redis_mini_partition_writable") for w in workers]
        away_seconds = time.monotonic() - killed_at

        doomed.start()  # it rejoins as the promoted master's replica
        cluster.wait_ok()
        poll(lambda: master_port(doomed) == replica.port, 60, what="the node back as a replica")
        time.sleep(3.0)
        for load in loads:
            load.stop()
        accepted = [t for x in loads for t in x.accepted]
        with httpx.Client(base_url=api.base_url, timeout=15) as client:
            outcomes = collect(client, accepted, timeout=180)
        # The same worker processes throughout: none exited to get past the outage.
        workers_alive = [w.process.poll() is None for w in workers]
    finally:
        for load in loads:
            load.stop()
        for service in services:
            service.close()

    away_answers = Counter(
        answer.status
        for x, start, end in zip(loads, answered_at_kill, answered_at_return, strict=True)
        for answer in x.answers[start:end]
    )
    share = away_answers[202] / max(1, sum(away_answers.values()))
    rerouted = sum(1 for ids in settled for t in ids if int(t.split("-")[0]) in stranded)
    tally = Tally.of(outcomes)
    tally.report(
        "master-away",
        away_s=f"{away_seconds:.1f}",
        failover_s=f"{failover_seconds:.1f}",
        answers_while_away=dict(away_answers),
        accepted_share_while_away=f"{share:.3f}",
        settled_while_away=dict(while_away),
        accepted_during_failover_then=dict(of_failover),
        stranded_partitions=sorted(stranded),
        stranded_tasks_accepted_while_away=rerouted,
        writable_partitions_seen=writable,
    )
    logs = "\n".join(f"{s.name}:\n{_notable(s.log)}" for s in services)
    assert while_away == {"DONE": sum(while_away.values())}, (
        f"tasks accepted after the failover, {FINISH_WITHIN:g}s before the node came back: "
        f"{dict(while_away)}\n{logs}"
    )
    assert sum(while_away.values()) > 100, while_away
    assert share >= TARGET_ACCEPTED_SHARE, f"{dict(away_answers)}\n{logs}"
    assert set(away_answers) <= {202, 503}, away_answers
    assert all(int(a.retry_after or 0) > 0 for x in loads for a in x.answers if a.status == 503)
    assert tally.lost == 0, f"{tally}\n{logs}"
    assert tally.done == tally.accepted, tally
    assert workers_alive == [True, True], logs
    assert "Traceback" not in api.log, _notable(api.log)
