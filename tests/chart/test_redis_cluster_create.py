"""The cluster mode's create Job and readiness probe, run as rendered against a real local cluster.

The Job runs files/redis/create-cluster.sh from a ConfigMap; these tests take the script from
the rendered ConfigMap and the Job's own environment, and run it with `sh` against six
cluster-enabled servers on loopback (node addresses by host name, as pods are dialled).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fastapi_redis_mini_harness.redis_cluster import RedisCluster, cluster_info

from ..support.tools import require_tool
from .helm import CHART, only, pod_spec, render

PASSWORD = "cluster-test-password"
CLUSTER_VALUES: dict[str, Any] = {"redis": {"mode": "cluster"}}


@pytest.fixture(params=["valkey", "redis"])
def nodes(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RedisCluster]:
    """Six cluster-enabled servers, started but not joined: a StatefulSet before its Job."""
    monkeypatch.setenv("TEST_REDIS_SERVER", request.param)
    cluster = RedisCluster(password=PASSWORD)
    try:
        cluster.start_nodes()
        yield cluster
    finally:
        cluster.close()


def job_env(values: dict[str, Any]) -> dict[str, Any]:
    objects = render(values)
    job = only(objects, "Job", "redis-cluster-create")
    (container,) = pod_spec(job)["containers"]
    assert container["command"] == ["sh", "/scripts/create-cluster.sh"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def shipped_script(tmp_path: Path) -> Path:
    """The script exactly as the Job mounts it from the rendered ConfigMap."""
    scripts = only(render(CLUSTER_VALUES), "ConfigMap", "redis-cluster-create")
    text: str = scripts["data"]["create-cluster.sh"]
    assert text.strip() == (CHART / "files" / "redis" / "create-cluster.sh").read_text().strip()
    path = tmp_path / "create-cluster.sh"
    path.write_text(text)
    return path


def run_script(script: Path, cluster: RedisCluster) -> subprocess.CompletedProcess[str]:
    rendered = job_env(CLUSTER_VALUES)
    rendered_nodes = str(rendered["REDIS_NODES"]).split()
    assert len(rendered_nodes) == len(cluster.nodes)  # the Job lists every pod of the StatefulSet
    env = {
        "PATH": os.environ["PATH"],
        "REDIS_NODES": " ".join(f"localhost:{node.port}" for node in cluster.nodes),
        "REDIS_CLUSTER_REPLICAS": str(rendered["REDIS_CLUSTER_REPLICAS"]),
        "CLUSTER_WAIT_SECONDS": "60",
        "REDISCLI_AUTH": PASSWORD,
    }
    return subprocess.run(
        ["sh", str(script)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def node_ids(cluster: RedisCluster) -> dict[int, str]:
    ids = {}
    for node in cluster.nodes:
        client = node.client()
        try:
            ids[node.port] = str(client.cluster("MYID"))
        finally:
            client.close()
    return ids


@pytest.mark.slow
def test_the_jobs_script_creates_the_cluster_once_and_then_does_nothing(
    nodes: RedisCluster, tmp_path: Path
) -> None:
    script = shipped_script(tmp_path)
    first = run_script(script, nodes)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "cluster created" in first.stdout
    nodes.wait_ok(30)
    assert sorted(nodes.roles().values()) == ["master"] * 3 + ["slave"] * 3
    before = node_ids(nodes)

    again = run_script(script, nodes)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to create" in again.stdout
    assert node_ids(nodes) == before
    nodes.wait_ok(30)


@pytest.mark.slow
def test_the_jobs_script_says_which_node_is_left_out_of_an_existing_cluster(
    nodes: RedisCluster, tmp_path: Path
) -> None:
    script = shipped_script(tmp_path)
    assert run_script(script, nodes).returncode == 0
    # A pod that came back with an empty volume: a fresh node the cluster does not know.
    replaced = nodes.nodes[-1]
    replaced.stop(kill=True)
    (replaced.data_dir / "nodes.conf").unlink()
    replaced.start()
    result = run_script(script, nodes)
    assert f"localhost:{replaced.port} is not in the cluster" in result.stdout
    client = replaced.client()
    try:
        assert cluster_info(client)["cluster_known_nodes"] == "1"  # nothing was joined by guess
    finally:
        client.close()


def readiness_command(port: int) -> list[str]:
    values = {"redis": {"mode": "cluster", "port": port}}
    statefulset = only(render(values), "StatefulSet", "redis")
    (container,) = [c for c in pod_spec(statefulset)["containers"] if c["name"] == "redis"]
    command: list[str] = container["readinessProbe"]["exec"]["command"]
    return command


@pytest.mark.slow
def test_a_node_is_ready_before_it_joins_and_in_a_healthy_cluster_but_not_when_down(
    nodes: RedisCluster, tmp_path: Path
) -> None:
    node = nodes.nodes[0]
    command = readiness_command(node.port)
    env = {"PATH": os.environ["PATH"], "REDISCLI_AUTH": PASSWORD}

    def ready() -> bool:
        return subprocess.run(command, env=env, capture_output=True, timeout=10).returncode == 0

    assert ready(), (
        "a node not yet joined must be ready, or `helm install --wait` never reaches the Job"
    )
    assert run_script(shipped_script(tmp_path), nodes).returncode == 0
    assert ready()
    node.stop(kill=True)
    assert not ready()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=node.port, socket_connect_timeout=1).ping()


def test_the_create_script_is_shellcheck_clean_for_posix_sh() -> None:
    shellcheck = require_tool("shellcheck", "shellcheck")
    script = CHART / "files" / "redis" / "create-cluster.sh"
    result = subprocess.run(
        [shellcheck, "--shell=sh", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout
