"""A network partition, as Jepsen makes one: the busiest master cut off with a client beside it.

Eight hosts, each a network namespace the test makes (harness netns.py): six Redis Cluster
nodes (3 masters, 3 replicas, cluster-node-timeout 2 s) and two clients, each an api and a
worker with a submitter in front. Both clients submit throughout. The master serving the
most queue partitions is cut off, together with the client on the minority side, from its
replica and the other masters; the cut lasts until the majority has promoted the replica and
longer than CUT_SECONDS, then heals, and the old master rejoins as a replica.

Redis Cluster's documentation predicts what happens: during the node timeout the master on
the minority side goes on accepting writes; once it rejoins, it follows the promoted replica
and drops them. With DURABLE_ACKS=replica a 202 waited for the replica, so the isolated master
can acknowledge nothing and no accepted task is lost. With DURABLE_ACKS=none the 202s it gave
after the cut are lost, exactly those; the test finds them and prints how many.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest
import redis

from fastapi_redis_mini.core.redis.keys import Partitions
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness import netns
from fastapi_redis_mini_harness.netns import Host, Network
from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_cluster import NODE_TIMEOUT_MS, RedisCluster, cluster_info
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support.http import client_per_thread
from ._chaos import collect

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.netns]

NODE_TIMEOUT = NODE_TIMEOUT_MS / 1000
# The cut outlasts the node timeout five times over: the majority fails over well within it.
CUT_SECONDS = 10.0
WARM_UP_SUBMITS = 100  # accepted on each side before the cut
AFTER_HEAL_SECONDS = 3.0
# Each side sends a submit every SUBMIT_INTERVAL, about 100 a second.
SUBMIT_INTERVAL = 0.01
SUBMIT_TIMEOUT = 15.0
MAX_IN_FLIGHT = 600
SUBMITS_PER_SIDE = 10_000
LOAD_SECONDS_AT_MOST = 180.0
SERVICE_ENV = {"REDIS_CLUSTER": "true", "CLAIM_IDLE": "5"}
MINORITY, MAJORITY = "minority", "majority"


@dataclass(frozen=True)
class Submit:
    """One POST /tasks: when it was sent and answered (monotonic), and the answer (0: none
    within SUBMIT_TIMEOUT; the client cannot know whether such a task exists, and it is
    counted as neither accepted nor lost)."""

    side: str
    sent: float
    answered: float
    status: int
    task_id: str | None


@dataclass
class SideLoad:
    """Submits to one side's api at a steady rate, whether earlier ones were answered or not,
    as many independent clients would: a submit stuck on an unreachable node holds up none
    after it. At most MAX_IN_FLIGHT wait at once; the rest wait for a place."""

    side: str
    host: Host
    api: Process
    submits: list[Submit] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: Future[None] | None = None

    def start(self) -> None:
        self._running = self.host.submit(asyncio.run, self._submit_all())

    def halt(self) -> None:
        """Send no more submits; those in flight still get their answer."""
        self._stop.set()

    def stop(self) -> None:
        self.halt()
        if self._running is not None:
            self._running.result(timeout=SUBMIT_TIMEOUT + 30)

    def accepted(self) -> list[Submit]:
        return [submit for submit in self.submits if submit.status == 202]

    async def _submit_all(self) -> None:
        deadline = time.monotonic() + LOAD_SECONDS_AT_MOST
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT)
        places = asyncio.Semaphore(MAX_IN_FLIGHT)
        async with httpx.AsyncClient(
            base_url=self.api.base_url, timeout=SUBMIT_TIMEOUT, limits=limits
        ) as client:
            in_flight: set[asyncio.Task[None]] = set()
            for n in range(SUBMITS_PER_SIDE):
                if self._stop.is_set() or time.monotonic() > deadline:
                    break
                await places.acquire()
                task = asyncio.create_task(self._submit(client, n, places))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                await asyncio.sleep(SUBMIT_INTERVAL)
            await asyncio.gather(*in_flight)

    async def _submit(self, client: httpx.AsyncClient, n: int, places: asyncio.Semaphore) -> None:
        body = {"prompt": f"{self.side} {n}", "params": {"duration": 0.01}}
        sent = time.monotonic()
        try:
            response = await client.post("/tasks", json=body)
        except httpx.TransportError:
            self.submits.append(Submit(self.side, sent, time.monotonic(), 0, None))
            return
        finally:
            places.release()
        task_id = response.json()["task_id"] if response.status_code == 202 else None
        answered = time.monotonic()
        self.submits.append(Submit(self.side, sent, answered, response.status_code, task_id))


@dataclass
class Partition:
    """What one run saw: every submit, the cut's timeline, and every accepted task's end."""

    durable_acks: str
    server: str  # "valkey 9.0.1"
    submits: list[Submit]
    isolated_partitions: frozenset[int]  # the queue partitions the cut master served
    # The cut is made by a command run between these two moments: a submit answered in
    # between may have been acknowledged on either side of it.
    cut_began: float
    cut_at: float
    isolated_master_failed_at: float  # when it stopped taking writes (cluster_state:fail)
    failover_at: float
    healed_at: float
    statuses: dict[str, str]  # task id -> its final status, or MISSING (404) once healed

    def on_isolated_master(self, submit: Submit) -> bool:
        assert submit.task_id is not None
        return int(submit.task_id.split("-", 1)[0]) in self.isolated_partitions

    def accepted(self, side: str | None = None) -> list[Submit]:
        return [
            submit
            for submit in self.submits
            if submit.status == 202 and (side is None or submit.side == side)
        ]

    def lost(self) -> set[str]:
        return {task_id for task_id, status in self.statuses.items() if status != "DONE"}

    def surely_lost(self) -> set[str]:
        """The cut side's 202s from the cut master for submits sent after the cut was made and
        answered before it healed: no part of them can have reached the replica."""
        return {
            str(submit.task_id)
            for submit in self.accepted(MINORITY)
            if self.on_isolated_master(submit)
            and self.cut_at < submit.sent
            and submit.answered < self.healed_at
        }

    def maybe_lost(self) -> set[str]:
        """Every 202 the cut master may have given without its replica hearing of it: the
        cut side's answered while the cut was being made or while it lasted, the majority
        side's answered while it was being made."""
        return {
            str(submit.task_id)
            for submit in self.accepted()
            if self.on_isolated_master(submit)
            and self.cut_began < submit.answered
            and submit.answered < (self.healed_at if submit.side == MINORITY else self.cut_at)
        }

    def timeline(self, task_ids: set[str]) -> list[str]:
        """Each task's submit: its side, and when it was sent and answered, from the cut."""
        return [
            f"{s.side} {s.task_id} sent {s.sent - self.cut_at:+.3f} s, "
            f"answered {s.answered - self.cut_at:+.3f} s"
            for s in self.accepted()
            if s.task_id in task_ids
        ]

    def last_202_while_cut(self, side: str) -> float | None:
        """When the side's last 202 of the cut came, or None without one."""
        return max(
            (s.answered for s in self.accepted(side) if self.cut_at < s.answered < self.healed_at),
            default=None,
        )

    def report(self) -> str:
        lines = [f"network partition, {self.server}, DURABLE_ACKS={self.durable_acks}:"]
        for side in (MINORITY, MAJORITY):
            answers = Counter(s.status for s in self.submits if s.side == side)
            accepted = self.accepted(side)
            during = [s for s in accepted if self.cut_at < s.answered < self.healed_at]
            lost = [s for s in accepted if s.task_id in self.lost()]
            sent_while_cut = [
                s for s in self.submits if s.side == side and self.cut_at < s.sent < self.healed_at
            ]
            held = sum(1 for s in sent_while_cut if s.answered > self.healed_at)
            longest = max((s.answered - s.sent for s in sent_while_cut), default=0.0)
            lines.append(
                f"  {side}: accepted {len(accepted)} ({len(during)} during the cut), "
                f"lost {len(lost)}, answers {dict(sorted(answers.items()))}; of "
                f"{len(sent_while_cut)} sent while cut, {held} answered only after the heal, "
                f"the longest after {longest:.1f} s"
            )
        accepted = self.accepted()
        done = sum(1 for status in self.statuses.values() if status == "DONE")
        window = self.last_202_while_cut(MINORITY) or self.cut_at
        lines.append(
            f"  accepted {len(accepted)}, done {done}, lost {len(self.lost())}; "
            f"cut {self.healed_at - self.cut_at:.1f} s; the cut master (serving "
            f"{len(self.isolated_partitions)} partitions) declared the cluster failed after "
            f"{self.isolated_master_failed_at - self.cut_at:.1f} s, the minority side's last "
            f"202 came {window - self.cut_at:.1f} s into the cut, the majority promoted the "
            f"replica after {self.failover_at - self.cut_at:.1f} s"
        )
        return "\n".join(lines)


@dataclass
class Site:
    network: Network
    cluster: RedisCluster
    nodes: dict[RedisServer, Host]
    minority: Host
    majority: Host


@pytest.fixture
def site() -> Iterator[Site]:
    """Six cluster nodes and two clients, each on a host of its own; all gone afterwards."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")
    with Network() as network:
        node_hosts = [network.add_host(f"n{i}") for i in range(1, 7)]
        minority, majority = network.add_host("client-a"), network.add_host("client-b")
        cluster = RedisCluster(hosts=[host.address for host in node_hosts])
        try:
            hosted = dict(zip(cluster.nodes, node_hosts, strict=True))
            starts = [host.submit(node.start) for node, host in hosted.items()]
            for started in starts:
                started.result()
            majority.run(cluster.create)
            yield Site(network, cluster, hosted, minority, majority)
        finally:
            cluster.close()


def _replication(node: RedisServer) -> dict[str, object]:
    with node.client() as client:
        return dict(client.info("replication"))


def _state(node: RedisServer) -> str:
    with node.client() as client:
        return cluster_info(client).get("cluster_state", "")


def _is(node: RedisServer, role: str) -> bool:
    try:
        return _replication(node)["role"] == role
    except redis.RedisError:
        return False


def _has_accepted(load: SideLoad, count: int) -> bool:
    return len(load.accepted()) >= count


def _now_if(condition: Callable[[], bool]) -> Callable[[], float | None]:
    """A poll probe: the moment `condition` first holds."""
    return lambda: time.monotonic() if condition() else None


def _finals(api: Process, task_ids: Iterable[str], timeout: float) -> dict[str, str]:
    """Each task's final status, or MISSING for a task the cluster no longer has (404)."""
    with httpx.Client(base_url=api.base_url, timeout=15) as client:

        def first_look(task_id: str) -> int:
            for _ in range(50):  # 503s while the healed cluster settles, 0.2 s apart
                code = own().get(f"/tasks/{task_id}").status_code
                if code in (200, 404):
                    return code
                time.sleep(0.2)
            return code

        ids = list(task_ids)
        with client_per_thread(client) as own, ThreadPoolExecutor(8) as pool:
            codes = dict(zip(ids, pool.map(first_look, ids), strict=True))
        present = [task_id for task_id in ids if codes[task_id] != 404]
        outcomes = collect(client, present, timeout=timeout)
    finals = {task_id: "MISSING" for task_id in ids if codes[task_id] == 404}
    finals.update({task_id: str(task.get("status")) for task_id, task in outcomes.items()})
    return finals


def partition_the_busiest_master(site: Site, durable_acks: str) -> Partition:
    """The scenario of the module docstring; returns what it saw."""
    cluster, minority, majority = site.cluster, site.minority, site.majority
    partitions = Partitions.from_settings(Settings(), cluster=True)
    master_of = {
        keys.index: majority.run(cluster.master_of, keys.stream) for keys in partitions.all
    }
    served = Counter(master_of.values())
    cut_master = max(served, key=lambda node: served[node])
    replica = next(
        node
        for node in cluster.nodes
        if majority.run(_replication, node).get("master_port") == cut_master.port
    )
    isolated = frozenset(index for index, node in master_of.items() if node is cut_master)

    env = {**SERVICE_ENV, "DURABLE_ACKS": durable_acks}
    services: list[Process] = []
    loads: dict[str, SideLoad] = {}
    try:
        # All four start at once: on two cores their imports overlap instead of queueing.
        sides = ((MINORITY, minority, cut_master.url), (MAJORITY, majority, replica.url))
        apis = {
            side: host.submit(start_api, url, env, name=f"api-{side}") for side, host, url in sides
        }
        workers = [
            host.submit(start_worker, url, env, name=f"worker-{side}") for side, host, url in sides
        ]
        wait([*apis.values(), *workers])
        # Every one that started is closed below, also when another failed to.
        services += [f.result() for f in (*apis.values(), *workers) if f.exception() is None]
        for side, host, _ in sides:
            loads[side] = SideLoad(side, host, apis[side].result())
        for load in loads.values():
            load.start()
        for load in loads.values():
            poll(
                partial(_has_accepted, load, WARM_UP_SUBMITS),
                60,
                what=f"{WARM_UP_SUBMITS} submits accepted on the {load.side} side",
            )

        cut_began = time.monotonic()
        site.network.cut([site.nodes[cut_master], minority])
        cut_at = time.monotonic()
        failed = minority.submit(
            poll, _now_if(lambda: _state(cut_master) == "fail"), 30, 0.05,
            "the isolated master declaring the cluster failed",
        )  # fmt: skip
        failover_at = majority.run(
            poll, _now_if(lambda: _is(replica, "master")), 60, 0.1,
            "the majority promoting the cut master's replica",
        )  # fmt: skip
        isolated_master_failed_at = failed.result(timeout=60)
        time.sleep(max(0.0, cut_at + CUT_SECONDS - time.monotonic()))
        site.network.heal()
        healed_at = time.monotonic()

        majority.run(cluster.wait_ok, 60)
        assert majority.run(_replication, cut_master).get("master_port") == replica.port, (
            "the cut master must rejoin as the promoted replica's replica"
        )
        time.sleep(AFTER_HEAL_SECONDS)
        for load in loads.values():
            load.stop()
        submits = [submit for load in loads.values() for submit in load.submits]
        accepted = [str(s.task_id) for s in submits if s.status == 202]
        statuses = majority.run(_finals, loads[MAJORITY].api, accepted, 120)
    except BaseException:
        for service in services:
            print(f"\n----- {service.name} log, last 40 lines -----\n{service.log_tail(40)}")
        raise
    finally:
        for load in loads.values():
            load.halt()
        for service in services:
            service.close()
    return Partition(
        durable_acks,
        majority.run(cut_master.version),
        submits,
        isolated,
        cut_began,
        cut_at,
        isolated_master_failed_at,
        failover_at,
        healed_at,
        statuses,
    )


def _unexpected_answers(run: Partition) -> dict[int, int]:
    """Answers other than 202, 503 and none in time (0): a 500, a 4xx for a valid submit."""
    return dict(Counter(s.status for s in run.submits if s.status not in (0, 202, 503)))


def test_with_replica_acks_a_partition_loses_no_accepted_task(site: Site) -> None:
    """Every 202 waited for a replica, and the cut master has none on its side: it accepts
    nothing once cut, and every task accepted on either side is DONE after healing."""
    run = partition_the_busiest_master(site, "replica")
    print("\n" + run.report())
    assert run.failover_at < run.healed_at
    assert not _unexpected_answers(run)
    sent_into_the_cut = [
        s for s in run.accepted(MINORITY) if run.cut_at < s.sent and s.answered < run.healed_at
    ]
    assert sent_into_the_cut == [], "the minority side accepted a task the cut kept from a replica"
    assert run.lost() == set(), f"lost {len(run.lost())}: {Counter(run.statuses.values())}"
    assert len(run.accepted(MAJORITY)) > WARM_UP_SUBMITS


def test_without_replica_acks_the_cut_master_loses_what_it_accepted_while_cut(
    site: Site,
) -> None:
    """The loss Redis Cluster's documentation predicts for the minority side: the cut master
    goes on acknowledging writes until the node timeout tells it it is alone, and drops them
    when it rejoins as a replica. Exactly those 202s are lost: every one for a submit sent
    after the cut; possibly one answered while the cut was being made, on either side;
    nothing else."""
    run = partition_the_busiest_master(site, "none")
    print("\n" + run.report())
    lost = run.lost()
    certain, at_risk = run.surely_lost(), run.maybe_lost()
    assert certain, "the cut master acknowledged nothing while cut: no window was exercised"
    assert certain <= lost, f"{len(certain - lost)} writes of the cut master survived the heal"
    assert lost <= at_risk, (
        f"{len(lost - at_risk)} lost tasks the cut master cannot have acknowledged while cut: "
        f"{run.timeline(lost - at_risk)}"
    )
    assert {run.statuses[task_id] for task_id in lost} == {"MISSING"}
    assert not _unexpected_answers(run)
    last_minority_202 = run.last_202_while_cut(MINORITY)
    assert last_minority_202 is not None
    assert last_minority_202 - run.cut_at < NODE_TIMEOUT + 2.0, (
        "the cut master stopped acknowledging writes later than the node timeout says"
    )
