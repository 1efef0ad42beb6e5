"""The local Redis Cluster the tests run on: real, spread over its masters, and torn down clean."""

from __future__ import annotations

import socket

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from fastapi_redis_mini_harness.redis_cluster import (
    BUS_PORT_OFFSET,
    RedisCluster,
    cluster_info,
    cluster_ports,
)

pytestmark = pytest.mark.slow  # six server processes


def test_the_cluster_has_three_masters_each_with_one_replica(redis_cluster: RedisCluster) -> None:
    roles = redis_cluster.roles()
    assert sorted(roles.values()) == ["master"] * 3 + ["slave"] * 3
    masters_of_replicas = set()
    for port, role in roles.items():
        client = redis.Redis(port=port, decode_responses=True)
        try:
            info = cluster_info(client)
            assert info["cluster_state"] == "ok"
            assert info["cluster_slots_ok"] == "16384"
            if role == "slave":
                masters_of_replicas.add(int(client.info("replication")["master_port"]))
        finally:
            client.close()
    # Each master has its own replica.
    assert masters_of_replicas == {port for port, role in roles.items() if role == "master"}
    assert all(port + BUS_PORT_OFFSET < 65536 for port in roles)


def test_keys_written_through_a_cluster_client_land_on_every_master(
    redis_cluster_url: str, redis_cluster: RedisCluster
) -> None:
    client = ClusterClient.from_url(redis_cluster_url, decode_responses=True)
    try:
        for i in range(60):
            client.set(f"spread:{i}", i)
        assert client.get("spread:7") == "7"
    finally:
        client.close()
    masters = [port for port, role in redis_cluster.roles().items() if role == "master"]
    for port in masters:
        node = redis.Redis(port=port)
        try:
            assert node.dbsize() > 0, f"master {port} holds none of 60 keys"
        finally:
            node.close()


def test_a_cluster_closes_its_own_processes_and_directories() -> None:
    cluster = RedisCluster(masters=3, replicas_per_master=0)
    cluster.start()
    try:
        assert set(cluster.roles().values()) == {"master"}
    finally:
        cluster.close()
    assert all(node.process is None for node in cluster.nodes)
    assert not any(path.exists() for path in cluster.data_dirs)


def test_a_cluster_of_one_master_serves_every_slot_and_takes_a_replica() -> None:
    cluster = RedisCluster(masters=1, replicas_per_master=1)
    cluster.start()
    try:
        roles = cluster.roles()
        assert sorted(roles.values()) == ["master", "slave"]
        master = next(port for port, role in roles.items() if role == "master")
        replica = next(port for port, role in roles.items() if role == "slave")
        # Every slot is the master's, so any key is written there without a redirect.
        node = redis.Redis(port=master, decode_responses=True)
        try:
            assert cluster_info(node)["cluster_slots_ok"] == "16384"
            for i in range(20):
                node.set(f"one:{i}", i)
        finally:
            node.close()
        follower = redis.Redis(port=replica, decode_responses=True)
        try:
            assert int(follower.info("replication")["master_port"]) == master
        finally:
            follower.close()
    finally:
        cluster.close()


def test_a_node_whose_ports_were_taken_after_the_pick_starts_on_another_pair() -> None:
    """Ports are checked free, then bound later: a process outside the cluster can take one
    in between. The node must start on a new pair, and never take the intruder for itself."""
    cluster = RedisCluster()
    picked = [node.port for node in cluster.nodes]
    with socket.socket() as on_port, socket.socket() as on_bus:
        # Bound, not listening: the port cannot be bound again, and a connection is refused.
        on_port.bind(("127.0.0.1", picked[0]))
        on_bus.bind(("127.0.0.1", picked[1] + BUS_PORT_OFFSET))
        try:
            cluster.start()
            started = [node.port for node in cluster.nodes]
            assert started[0] != picked[0]
            assert started[1] != picked[1]
            assert started[2:] == picked[2:]
            with cluster.nodes[0].client() as client:
                assert cluster_info(client)["cluster_state"] == "ok"
        finally:
            cluster.close()


def test_each_test_process_picks_cluster_ports_from_its_own_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shares = []
    for index in range(4):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
        shares.append(set(cluster_ports(6)))
    for index, share in enumerate(shares):
        for other in shares[index + 1 :]:
            assert not share & other
