"""Cluster mode's start and bootstrap scripts, run as rendered against real local servers.

Each Redis pod runs files/redis/start-node.sh as its command and files/redis/bootstrap-cluster.sh
in its cluster-bootstrap container. These tests take both scripts from the rendered ConfigMap
and the environment from the rendered StatefulSet, and run them with `sh` against six
cluster-enabled servers on loopback: each server is started through start-node.sh, as a pod's
is, and one bootstrap process per "pod" runs beside it. Pod DNS is a stand-in `getent` that
answers for the pods' names.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastapi_redis_mini_harness.redis_cluster import RedisCluster, cluster_info, redis_cli

from ..support.tools import require_tool
from .helm import CHART, only, pod_spec, render

PASSWORD = "cluster-test-password"
CLUSTER_VALUES: dict[str, Any] = {"redis": {"mode": "cluster"}}
POD_DOMAIN = "demo-redis.tasks.svc.test"
POD_NAME = "demo-fastapi-redis-mini-redis-{}"
# Pod DNS: every pod name resolves to loopback, where all the servers listen; addresses resolve
# to themselves, as getent answers for an address.
GETENT = f"""#!/bin/sh
case "$2" in
  *.{POD_DOMAIN}|127.0.0.1) echo "127.0.0.1 $2" ;;
  *) exit 2 ;;
esac
"""


def rendered_script(name: str) -> str:
    scripts = only(render(CLUSTER_VALUES), "ConfigMap", "redis-scripts")
    text: str = scripts["data"][name]
    assert text.strip() == (CHART / "files" / "redis" / name).read_text().strip()
    return text


def containers() -> dict[str, dict[str, Any]]:
    statefulset = only(render(CLUSTER_VALUES), "StatefulSet", "redis")
    return {c["name"]: c for c in pod_spec(statefulset)["containers"]}


def rendered_env(container: str) -> dict[str, Any]:
    env = containers()[container]["env"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in env}


class Pods:
    """Six nodes started as the StatefulSet's pods are, and their bootstrap processes."""

    def __init__(self, root: Path, cluster: RedisCluster) -> None:
        self.root = root
        self.cluster = cluster
        self.bin = root / "bin"
        self.bin.mkdir()
        (self.bin / "getent").write_text(GETENT)
        (self.bin / "getent").chmod(0o755)
        (self.bin / "redis-cli").symlink_to(redis_cli())
        (root / "redis.conf").write_text("")
        self.start_node = root / "start-node.sh"
        self.start_node.write_text(rendered_script("start-node.sh"))
        self.bootstrap = root / "bootstrap-cluster.sh"
        self.bootstrap.write_text(rendered_script("bootstrap-cluster.sh"))
        env = rendered_env("redis")
        assert env["REDIS_CLUSTER"] == "true"
        assert {"POD_NAME", "POD_IP", "REDIS_POD_DOMAIN", "REDIS_PASSWORD"} <= set(env)
        assert containers()["redis"]["command"] == ["sh", "/scripts/start-node.sh"]
        for ordinal, node in enumerate(cluster.nodes):
            server_bin = root / f"server-bin-{ordinal}"
            server_bin.mkdir()
            (server_bin / "redis-server").symlink_to(node.binary)
            run_dir = root / f"run-{ordinal}"
            run_dir.mkdir()
            wrapper = root / f"pod-{ordinal}.sh"
            wrapper.write_text(
                "#!/bin/sh\n"
                f"export PATH={server_bin}:{self.bin}:$PATH REDIS_PASSWORD={PASSWORD}\n"
                f"export REDIS_CLUSTER=true POD_NAME={POD_NAME.format(ordinal)} POD_IP=127.0.0.1\n"
                f"export REDIS_POD_DOMAIN={POD_DOMAIN} REDIS_BASE_CONFIG={root / 'redis.conf'}\n"
                f"export REDIS_DATA_DIR={node.data_dir} REDIS_RUN_DIR={run_dir} RESOLVE_SECONDS=3\n"
                f'exec sh {self.start_node} "$@"\n'
            )
            wrapper.chmod(0o755)
            node.binary = str(wrapper)

    def bootstrap_env(self, ordinal: int) -> dict[str, str]:
        rendered = rendered_env("cluster-bootstrap")
        assert len(str(rendered["REDIS_NODES"]).split()) == len(self.cluster.nodes)
        return {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "REDIS_NODES": " ".join(f"127.0.0.1:{n.port}" for n in self.cluster.nodes),
            "REDIS_CLUSTER_REPLICAS": str(rendered["REDIS_CLUSTER_REPLICAS"]),
            "POD_NAME": POD_NAME.format(ordinal),
            "REDIS_PORT": str(self.cluster.nodes[ordinal].port),
            "REDISCLI_AUTH": PASSWORD,
            "BOOTSTRAP_INTERVAL": "0.3",
            "MEET_SECONDS": "1",
            "BOOTSTRAP_ONCE": "true",
        }

    def start_bootstrap(self, ordinal: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["sh", str(self.bootstrap)],
            env=self.bootstrap_env(ordinal),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[int | None, str]:
    """The exit status (None if it was still running after `timeout` and was stopped) and output."""
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return None, output


@pytest.fixture(params=["valkey", "redis"])
def pods(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Pods]:
    monkeypatch.setenv("TEST_REDIS_SERVER", request.param)
    cluster = RedisCluster(password=PASSWORD)
    try:
        yield Pods(tmp_path, cluster)
    finally:
        cluster.close()


def node_ids(cluster: RedisCluster) -> dict[int, str]:
    ids = {}
    for node in cluster.nodes:
        with node.client() as client:
            ids[node.port] = str(client.cluster("MYID"))
    return ids


def create(pods: Pods) -> None:
    """Every pod's bootstrap at once, as pods start: each ends once it is in a healthy cluster."""
    processes = [pods.start_bootstrap(i) for i in range(len(pods.cluster.nodes))]
    for ordinal, process in enumerate(processes):
        status, output = finish(process, 90)
        assert status == 0, f"pod {ordinal}: {output}"


@pytest.mark.slow
def test_pod_zero_creates_the_cluster_once_every_node_answers_and_later_leaves_it_alone(
    pods: Pods,
) -> None:
    cluster = pods.cluster
    late = cluster.nodes[-1]
    for node in cluster.nodes[:-1]:
        node.start()
    early = pods.start_bootstrap(0)
    status, output = finish(early, 3)
    assert status is None, "pod 0 must wait while a peer does not answer"
    assert f"waiting for 127.0.0.1:{late.port} to answer" in output
    for node in cluster.nodes[:-1]:
        with node.client() as client:
            assert cluster_info(client)["cluster_known_nodes"] == "1"

    late.start()
    create(pods)
    cluster.wait_ok(30)
    assert sorted(cluster.roles().values()) == ["master"] * 3 + ["slave"] * 3
    before = node_ids(cluster)

    status, output = finish(pods.start_bootstrap(0), 30)
    assert status == 0, output
    assert "creating" not in output
    assert "cluster_state ok with all 6 nodes" in output
    assert node_ids(cluster) == before


@pytest.mark.slow
def test_a_cluster_whose_pods_all_came_back_with_new_addresses_recovers(pods: Pods) -> None:
    cluster = pods.cluster
    cluster.start_nodes()
    create(pods)
    cluster.wait_ok(30)
    for node in cluster.nodes:
        node.stop()
    # Every node's view of the cluster names addresses that are gone: nothing listens on
    # 127.0.0.2, as nothing answers at a restarted pod's old IP.
    for node in cluster.nodes:
        conf = node.data_dir / "nodes.conf"
        text = conf.read_text()
        assert f"127.0.0.1:{node.port}@" in text
        conf.write_text(text.replace("127.0.0.1:", "127.0.0.2:"))

    cluster.start_nodes()
    for node in cluster.nodes:
        rewritten = (node.data_dir / "nodes.conf").read_text()
        assert "127.0.0.2:" not in rewritten, "start-node.sh left an old address in nodes.conf"
    cluster.wait_ok(60)


@pytest.mark.slow
def test_a_node_that_lost_its_volume_is_not_joined_by_guess_and_the_log_says_how(
    pods: Pods,
) -> None:
    cluster = pods.cluster
    cluster.start_nodes()
    create(pods)
    replaced = cluster.nodes[-1]
    replaced.stop(kill=True)
    (replaced.data_dir / "nodes.conf").unlink()
    replaced.start()
    status, output = finish(pods.start_bootstrap(len(cluster.nodes) - 1), 3)
    assert status is None  # it keeps checking, and the pod stays unready
    assert f"redis-cli --cluster add-node 127.0.0.1:{replaced.port} 127.0.0.1:" in output
    with replaced.client() as client:
        assert cluster_info(client)["cluster_known_nodes"] == "1"


def probe_command(probe: str) -> str:
    command: list[str] = containers()["redis"][probe]["exec"]["command"]
    assert command[:2] == ["sh", "-c"]
    return command[2]


@pytest.mark.parametrize(
    ("answer", "alive"),
    [
        ("PONG", True),
        ("LOADING Redis is loading the dataset in memory", True),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", True),
        ("Could not connect to Redis at 127.0.0.1:6379: Connection refused", False),
        ("NOAUTH Authentication required.", False),
    ],
)
def test_liveness_keeps_a_node_that_loads_or_waits_for_its_master(
    answer: str, alive: bool, tmp_path: Path
) -> None:
    fake = tmp_path / "redis-cli"
    fake.write_text(f"#!/bin/sh\necho {answer!r}\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    for probe in ("livenessProbe", "startupProbe"):
        result = subprocess.run(["sh", "-c", probe_command(probe)], env=env, check=False)
        assert (result.returncode == 0) is alive, (probe, answer)


@pytest.mark.slow
def test_a_node_is_ready_only_in_a_cluster_whose_state_is_ok(pods: Pods) -> None:
    cluster = pods.cluster
    cluster.start_nodes()
    node = cluster.nodes[0]
    command = re.sub(r"-p \d+", f"-p {node.port}", probe_command("readinessProbe"))
    env = {"PATH": os.environ["PATH"], "REDISCLI_AUTH": PASSWORD}

    def ready() -> bool:
        return subprocess.run(["sh", "-c", command], env=env, timeout=10).returncode == 0

    assert not ready(), "a node outside a cluster must not take client traffic"
    create(pods)
    cluster.wait_ok(30)
    assert ready()
    # Two of the three masters away: the one left is in the minority, no replica can be
    # promoted, and its state turns fail.
    for other in cluster.nodes[1:3]:
        other.stop(kill=True)
    deadline = time.monotonic() + 30
    while ready() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ready(), "a node whose cluster lost slots must leave the client Service"


@pytest.mark.parametrize("script", ["start-node.sh", "bootstrap-cluster.sh"])
def test_the_pod_scripts_are_shellcheck_clean_for_posix_sh(script: str) -> None:
    shellcheck = require_tool("shellcheck", "shellcheck")
    result = subprocess.run(
        [shellcheck, "--shell=sh", str(CHART / "files" / "redis" / script)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
