"""redis.acl: the api, the worker and KEDA reach the chart's Redis as a least-privilege user.

The rendered objects are checked first: the user's rules, where its password comes from, and
that the code names no command or key the rules leave out. Then the chart's own start-node.sh
starts a real server with the rendered redis.conf and rules, and the real api and worker,
connected as that user, run every path a client or an operator has: submit to DONE, a cache
hit, a delayed task, cancel, GET, the console's pages, the admin command and readiness. The
server's ACL LOG must stay empty, and what the rules leave out must be refused.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from fastapi_redis_mini.core.redis import Keys
from fastapi_redis_mini.core.redis.keys import Partitions
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_cluster import RedisCluster
from fastapi_redis_mini_harness.redis_server import server_binary

from .helm import CHART, QUOTAS_OFF, REPO, Rendered, Values, find, only, pod_spec, render

LUA = REPO / "services" / "fastapi_redis_mini" / "core" / "redis" / "lua"
COMMANDS_FILE = CHART / "files" / "redis" / "service-commands.txt"
SERVICE_USER = "fastapi-redis-mini"
ADMIN_KEY = "acl-admin-key-0123456789"
TENANT_KEY = "acl-tenant-key-abcdefghij"


def listed_commands(path: Path = COMMANDS_FILE) -> set[str]:
    lines = (line.strip().lower() for line in path.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def container(objects: list[Rendered], kind: str, component: str, name: str) -> dict[str, Any]:
    (found,) = [
        c for c in pod_spec(only(objects, kind, component))["containers"] if c["name"] == name
    ]
    result: dict[str, Any] = found
    return result


def env_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in spec.get("env", [])}


def config(objects: list[Rendered]) -> dict[str, str]:
    data: dict[str, str] = only(objects, "ConfigMap", "config")["data"]
    return data


def redis_data(objects: list[Rendered]) -> dict[str, str]:
    data: dict[str, str] = only(objects, "ConfigMap", "redis")["data"]
    return data


def acl_parts(rules: str) -> tuple[list[str], list[str], set[str]]:
    """Key patterns, channel patterns and allowed commands of one user's rendered rules."""
    words = rules.split()
    keys = [w[1:] for w in words if w.startswith("~")]
    channels = [w[1:] for w in words if w.startswith("&")]
    commands = {w[1:] for w in words if w.startswith("+")}
    return keys, channels, commands


# -- the rendered objects ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["standalone", "cluster"])
def test_redis_defines_the_service_user_with_exactly_the_listed_commands(mode: str) -> None:
    objects = render({"redis": {"mode": mode}, "api": {"submitRatePerKey": 0}})
    rules = redis_data(objects)["service-user.acl"]
    keys, channels, commands = acl_parts(rules)
    assert rules.split()[:2] == ["resetkeys", "resetchannels"]
    assert "-@all" in rules.split()
    assert commands == listed_commands()
    assert "*" not in keys
    assert "*" not in channels
    env = env_of(container(objects, "StatefulSet", "redis", "redis"))
    assert env["REDIS_SERVICE_USER"]["value"] == SERVICE_USER
    assert env["REDIS_SERVICE_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "service-password"


@pytest.mark.parametrize("mode", ["standalone", "cluster"])
def test_api_and_worker_connect_as_the_service_user_and_never_see_the_default_password(
    mode: str,
) -> None:
    objects = render(
        {
            "redis": {"mode": mode},
            "api": {"submitRatePerKey": 0},
            "worker": {"autoscaling": {"keda": {"enabled": True}}},
        }
    )
    url = urlsplit(config(objects)["REDIS_URL"])
    assert url.username == SERVICE_USER
    assert url.password is None  # the password comes from the Secret, never the ConfigMap
    secret = only(objects, "Secret", "redis")
    assert set(secret["data"]) == {"redis-password", "service-password"}
    for component in ("api", "worker"):
        env = env_of(container(objects, "Deployment", component, component))
        reference = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": secret["metadata"]["name"], "key": "service-password"}
    # KEDA reads the lag as the same user, with the same password.
    if mode == "standalone":
        (auth,) = only(objects, "TriggerAuthentication")["spec"]["secretTargetRef"]
        assert auth["key"] == "service-password"
        (trigger,) = only(objects, "ScaledObject")["spec"]["triggers"]
        assert trigger["metadata"]["usernameFromEnv"] == "REDIS_USERNAME"
        worker_env = env_of(container(objects, "Deployment", "worker", "worker"))
        assert worker_env["REDIS_USERNAME"]["value"] == SERVICE_USER


def test_the_probes_replication_and_bootstrap_keep_the_default_user() -> None:
    objects = render({"redis": {"mode": "cluster"}, "api": {"submitRatePerKey": 0}})
    for name in ("redis", "cluster-bootstrap"):
        env = env_of(container(objects, "StatefulSet", "redis", name))
        assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"


def test_the_exporter_gets_its_own_user_with_no_keys() -> None:
    objects = render({"redis": {"metrics": {"enabled": True}}})
    keys, channels, commands = acl_parts(redis_data(objects)["exporter-user.acl"])
    assert keys == []
    assert channels == []
    assert "info" in commands
    assert not commands & {"get", "keys", "scan", "flushall", "config|set", "evalsha"}
    exporter = env_of(container(objects, "StatefulSet", "redis", "metrics"))
    assert exporter["REDIS_USER"]["value"] == "redis-exporter"
    assert exporter["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "exporter-password"
    redis_env = env_of(container(objects, "StatefulSet", "redis", "redis"))
    assert redis_env["REDIS_EXPORTER_USER"]["value"] == "redis-exporter"
    assert set(only(objects, "Secret", "redis")["data"]) == {
        "redis-password",
        "service-password",
        "exporter-password",
    }


def test_acl_off_leaves_the_service_on_the_default_user() -> None:
    objects = render({"redis": {"acl": {"enabled": False}, "metrics": {"enabled": True}}})
    assert urlsplit(config(objects)["REDIS_URL"]).username is None
    assert "service-user.acl" not in redis_data(objects)
    assert set(only(objects, "Secret", "redis")["data"]) == {"redis-password"}
    env = env_of(container(objects, "Deployment", "api", "api"))
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    exporter = env_of(container(objects, "StatefulSet", "redis", "metrics"))
    assert "REDIS_USER" not in exporter


def test_an_external_redis_is_reached_as_its_url_says_whatever_redis_acl_is() -> None:
    objects = render(
        {
            "redis": {"mode": "external"},
            "externalRedis": {"url": "redis://redis.example:6379/0", "existingSecret": "ext"},
        }
    )
    assert config(objects)["REDIS_URL"] == "redis://redis.example:6379/0"
    assert find(objects, "Secret") == []


def test_an_existing_secret_must_hold_the_service_users_password_key() -> None:
    objects = render({"redis": {"auth": {"existingSecret": "mine"}}})
    env = env_of(container(objects, "Deployment", "worker", "worker"))
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mine",
        "key": "service-password",
    }


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"redis": {"acl": {"username": "has space"}}}, "username"),
        ({"redis": {"acl": {"enabled": "yes"}}}, "enabled"),
        ({"redis": {"acl": {"passwordKey": "a/b"}}}, "passwordKey"),
        ({"config": {"queueKey": "tasks*"}}, r"config.queueKey .* must hold no \*"),
    ],
)
def test_bad_acl_values_are_refused_naming_the_field(values: Values, complaint: str) -> None:
    from .helm import RenderError

    with pytest.raises(RenderError, match=complaint):
        render(values)


def test_every_command_a_script_runs_is_listed() -> None:
    called: set[str] = set()
    for script in LUA.glob("*.lua"):
        for command, sub in re.findall(
            r"redis\.p?call\(\s*['\"](\w+)['\"](?:\s*,\s*['\"](\w+)['\"])?", script.read_text()
        ):
            name = command.lower()
            called.add(f"{name}|{sub.lower()}" if name in ("xgroup", "xinfo") else name)
        # A script that publishes takes the command as an argument: PUBLISH or SPUBLISH.
    assert called, "no redis.call found: the pattern no longer matches the scripts"
    assert called - listed_commands() == set()
    assert {"publish", "spublish"} <= listed_commands()


@pytest.mark.parametrize(
    ("values", "partitions", "cluster"),
    [
        ({}, 1, False),
        ({"config": {"keyPrefix": "blue:"}}, 1, False),
        ({"config": {"queuePartitions": 4}, "api": {"submitRatePerKey": 0}}, 4, False),
        ({"redis": {"mode": "cluster"}, "api": {"submitRatePerKey": 0}}, 1, True),
        (
            {
                "redis": {"mode": "cluster"},
                "config": {"keyPrefix": "blue:", "queueKey": "jobs"},
                "api": {"submitRatePerKey": 0, "maxUnfinishedPerKey": 0, "maxStoredBytesPerKey": 0},
            },
            16,
            True,
        ),
    ],
)
def test_every_key_and_channel_the_code_names_is_in_the_users_patterns(
    values: Values, partitions: int, cluster: bool
) -> None:
    keys_allowed, channels_allowed, _ = acl_parts(redis_data(render(values))["service-user.acl"])
    given = values.get("config", {})
    settings = Settings(
        key_prefix=given.get("keyPrefix", ""),
        queue_key=given.get("queueKey", "task_stream"),
        queue_partitions=partitions,
        submit_rate_per_key=0,
        max_unfinished_per_key=0,
        max_stored_bytes_per_key=0,
    )
    layout = Partitions.from_settings(settings, cluster=cluster)
    assert len(layout) == partitions
    for keys in layout.all:
        for key in names_of(keys):
            assert any(fnmatchcase(key, p) for p in keys_allowed), key
        for channel in (keys.events, keys.reports, keys.work):
            assert any(fnmatchcase(channel, p) for p in channels_allowed), channel
    # And nothing of another queue on the same server.
    assert not any(fnmatchcase("other_queue:task:1", p) for p in keys_allowed)


def names_of(keys: Keys) -> list[str]:
    """Every key name of one partition, for sample arguments."""
    names = [
        keys.task("t"),
        keys.task_events("t"),
        keys.cache("sig"),
        keys.cache("sig", "tenant"),
        keys.idempotency("k", "tenant"),
        keys.inflight("sig", "tenant"),
        *keys.lanes,
        keys.lane_turns,
        keys.submit_quota("tenant"),
        keys.unfinished("tenant"),
        keys.stored_bytes("tenant"),
        keys.stream,
        keys.dead_letter,
        keys.webhooks_dead,
        keys.retries,
        keys.recent,
        keys.finished("DONE"),
        keys.counts(1),
        keys.probe,
    ]
    return names


# -- a real server with the rendered rules -----------------------------------------------


@dataclass
class AclServer:
    """The chart's Redis, started by its own start-node.sh, with its three passwords."""

    port: int
    process: subprocess.Popen[bytes]
    admin_password: str
    service_password: str
    exporter_password: str
    service_url: str
    service_env: dict[str, str]

    def admin(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.admin_password, decode_responses=True)

    def as_user(self, user: str, password: str) -> redis.Redis:
        return redis.Redis(port=self.port, username=user, password=password, decode_responses=True)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    port = free_port()
    objects = render({"redis": {"port": port, "metrics": {"enabled": True}}})
    root = tmp_path_factory.mktemp("acl")
    etc, data, run, bin_dir = (root / name for name in ("etc", "data", "run", "bin"))
    for directory in (etc, data, run, bin_dir):
        directory.mkdir()
    for name, text in redis_data(objects).items():
        # The pod's data volume is /data; here, a directory of the test's own.
        (etc / name).write_text(text.replace("dir /data", f"dir {data}"))
    # Valkey whatever TEST_REDIS_SERVER says: the rules name commands of Redis 7.2 and later
    # (the chart's image is 7.4), and Debian's redis-server is 7.0.
    (bin_dir / "redis-server").symlink_to(server_binary("valkey"))
    secret = {
        key: base64.b64decode(value).decode()
        for key, value in only(objects, "Secret", "redis")["data"].items()
    }
    redis_env = env_of(container(objects, "StatefulSet", "redis", "redis"))
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "REDIS_PASSWORD": secret["redis-password"],
        "REDIS_SERVICE_USER": redis_env["REDIS_SERVICE_USER"]["value"],
        "REDIS_SERVICE_PASSWORD": secret["service-password"],
        "REDIS_EXPORTER_USER": redis_env["REDIS_EXPORTER_USER"]["value"],
        "REDIS_EXPORTER_PASSWORD": secret["exporter-password"],
        "REDIS_BASE_CONFIG": str(etc / "redis.conf"),
        "REDIS_ACL_DIR": str(etc),
        "REDIS_RUN_DIR": str(run),
        "REDIS_DATA_DIR": str(data),
    }
    script = CHART / "files" / "redis" / "start-node.sh"
    log = (root / "redis.log").open("wb")
    # The pod listens on every address; on this machine, on loopback only.
    process = subprocess.Popen(
        ["sh", str(script), "--bind", "127.0.0.1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rendered = config(objects)
    host = urlsplit(rendered["REDIS_URL"]).hostname or ""
    server = AclServer(
        port=port,
        process=process,
        admin_password=secret["redis-password"],
        service_password=secret["service-password"],
        exporter_password=secret["exporter-password"],
        service_url=rendered["REDIS_URL"].replace(host, "127.0.0.1"),
        service_env={
            "REDIS_PASSWORD": secret["service-password"],
            "REDIS_CLUSTER": rendered["REDIS_CLUSTER"],
        },
    )
    try:
        admin = server.admin()

        def answers() -> bool:
            try:
                return bool(admin.ping())
            except redis.ConnectionError:
                assert process.poll() is None, (root / "redis.log").read_text()
                return False

        poll(answers, timeout=15, what="the chart's Redis did not start")
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def wait_for(
    client: httpx.Client, task_id: str, status: str, timeout: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task: dict[str, Any] = client.get(f"/tasks/{task_id}").json()
        if task["status"] == status:
            return task
        time.sleep(0.05)
    raise AssertionError(f"{task_id} never reached {status}: {task}")


def denials(server: AclServer) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = server.admin().acl_log()
    return entries


def path_env(lanes: str) -> dict[str, str]:
    return {
        "PRIORITY_LANES": lanes,
        "API_KEYS": TENANT_KEY,
        "CONSOLE_ENABLED": "true",
        "ADMIN_API_KEY": ADMIN_KEY,
        "MAX_RETRIES": "1",
        "RETRY_BACKOFF": "0.1",
    }


def run_every_path(url: str, env: dict[str, str]) -> None:
    """Submit to DONE, a cache hit, a failure, a delayed task, cancel, GET and a long-poll,
    the console's pages, readiness and the admin command, with the api and a worker on `url`."""
    processes: list[Process] = []
    try:
        processes.append(start_api(url, env, cwd=REPO))
        processes.append(start_worker(url, env, cwd=REPO))
        api, worker = processes
        tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
        with httpx.Client(base_url=api.base_url, headers=tenant, timeout=10) as client:
            body = {"prompt": "least privilege", "params": {"duration": 0.2}}
            submitted = client.post("/tasks", json=body)
            assert submitted.status_code == 202, submitted.text
            task_id = submitted.json()["task_id"]
            done = wait_for(client, task_id, "DONE")

            cached = client.post("/tasks", json=body)
            assert cached.status_code == 200
            assert cached.json()["cached"] is True
            assert cached.json()["result"] == done["result"]

            failing = client.post("/tasks", json={"prompt": "f", "params": {"fail": True}})
            wait_for(client, failing.json()["task_id"], "FAILED")

            delayed = client.post(
                "/tasks", json={"prompt": "later", "params": {}, "delay_seconds": 0.5}
            )
            assert delayed.status_code == 202, delayed.text
            wait_for(client, delayed.json()["task_id"], "DONE")

            long = client.post("/tasks", json={"prompt": "long", "params": {"duration": 20}})
            long_id = long.json()["task_id"]
            assert client.delete(f"/tasks/{long_id}").status_code in (200, 202)
            wait_for(client, long_id, "CANCELLED")
            waited = client.get(f"/tasks/{task_id}", params={"wait": 1})
            assert waited.json()["status"] == "DONE"
            assert client.get(f"/tasks/{'0' * 32}").status_code == 404

        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=api.base_url, headers=admin, timeout=10) as console:
            for path in (
                "/console",
                "/console/overview.json",
                "/console/tasks",
                f"/console/tasks/{task_id}",
                "/console/dead-letters",
                "/console/workers",
                "/console/scheduled",
            ):
                assert console.get(path).status_code == 200, path

        for process in processes:
            probe = process.base_url if process is api else f"http://127.0.0.1:{process.port}"
            assert httpx.get(f"{probe}/readyz", timeout=5).status_code == 200
        for command in (["stats"], ["dead-letter", "list"]):
            admin_run = subprocess.run(
                [sys.executable, "-m", "fastapi_redis_mini.admin", *command],
                env={**os.environ, "REDIS_URL": url, **env},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert admin_run.returncode == 0, admin_run.stderr
        assert "NOPERM" not in api.log + worker.log
    finally:
        for process in processes:
            process.close()


@pytest.mark.slow
@pytest.mark.parametrize("lanes", ["false", "true"])
def test_the_service_runs_every_path_as_the_acl_user_and_nothing_is_denied(
    acl_server: AclServer, lanes: str
) -> None:
    acl_server.admin().flushall()
    acl_server.admin().acl_log_reset()
    run_every_path(acl_server.service_url, {**acl_server.service_env, **path_env(lanes)})
    assert denials(acl_server) == []


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("CONFIG", "GET", "requirepass"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("ACL", "LIST"),
        ("CLIENT", "LIST"),
        ("MODULE", "LIST"),
        ("SWAPDB", "0", "1"),
        ("SHUTDOWN",),
        ("EVAL", "return 1", "0"),
        ("SCRIPT", "FLUSH"),
        ("GET", "someone-else:secret"),
        ("SUBSCRIBE", "someone-else:channel"),
    ],
)
def test_the_service_user_is_refused_what_the_list_leaves_out(
    acl_server: AclServer, command: tuple[str, ...]
) -> None:
    client = acl_server.as_user(SERVICE_USER, acl_server.service_password)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)  # type: ignore[no-untyped-call]
    assert client.ping()


def test_the_exporter_user_reads_statistics_but_no_key(acl_server: AclServer) -> None:
    client = acl_server.as_user("redis-exporter", acl_server.exporter_password)
    assert "used_memory" in client.info("memory")
    assert client.dbsize() >= 0
    for command in (("GET", "task:x"), ("FLUSHALL",), ("CONFIG", "SET", "maxmemory", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)  # type: ignore[no-untyped-call]


def test_the_default_password_still_opens_the_server_for_the_probes(acl_server: AclServer) -> None:
    assert acl_server.admin().ping()
    assert acl_server.admin().acl_whoami() == "default"


@pytest.fixture(scope="module")
def acl_cluster() -> Iterator[tuple[RedisCluster, str, dict[str, str]]]:
    """A 3-master cluster whose every node holds the service user of the chart's cluster mode,
    with the rules rendered for it; yields it, the service's URL and its settings."""
    values = {"redis": {"mode": "cluster"}, "api": QUOTAS_OFF}
    objects = render(values)
    rules = redis_data(objects)["service-user.acl"].split()
    password = "service-user-password-0123456789"
    cluster = RedisCluster(masters=3, replicas_per_master=0, password="default-password-0123")
    try:
        cluster.start()
        for node in cluster.nodes:
            client = node.client()
            try:
                client.acl_setuser(SERVICE_USER, reset=True)
                client.execute_command(  # type: ignore[no-untyped-call]
                    "ACL", "SETUSER", SERVICE_USER, "on", f">{password}", *rules
                )
            finally:
                client.close()
        rendered = config(objects)
        host = urlsplit(rendered["REDIS_URL"]).hostname or ""
        first = cluster.nodes[0]
        url = rendered["REDIS_URL"].replace(f"{host}:6379", f"127.0.0.1:{first.port}")
        env = {
            "REDIS_PASSWORD": password,
            "REDIS_CLUSTER": rendered["REDIS_CLUSTER"],
            "QUEUE_PARTITIONS": rendered["QUEUE_PARTITIONS"],
        }
        yield cluster, url, env
    finally:
        cluster.close()


@pytest.mark.slow
def test_on_a_cluster_the_service_runs_every_path_as_the_acl_user(
    acl_cluster: tuple[RedisCluster, str, dict[str, str]],
) -> None:
    cluster, url, env = acl_cluster
    assert urlsplit(url).username == SERVICE_USER
    assert env["QUEUE_PARTITIONS"] == "16"  # spread over every master
    run_every_path(url, {**env, **path_env("false")})
    for node in cluster.nodes:
        client = node.client()
        try:
            assert client.acl_log() == [], f"node {node.port} denied a command"
            client.execute_command(  # type: ignore[no-untyped-call]
                "AUTH", SERVICE_USER, env["REDIS_PASSWORD"]
            )
            for refused in (("CLUSTER", "RESET"), ("CLUSTER", "FAILOVER"), ("FLUSHALL",)):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.execute_command(*refused)  # type: ignore[no-untyped-call]
        finally:
            client.close()
