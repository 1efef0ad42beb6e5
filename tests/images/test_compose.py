"""compose.yaml: it parses into api, worker and a durable Redis, and that stack runs.

The run moves compose.yaml's services onto the host network (the engine here has no bridge,
and traffic stays on loopback): published ports go, `redis` maps to 127.0.0.1, every port is
a free one, and Redis is the Debian-based stand-in since no registry can serve the official
image. Everything else (users, read-only roots, tmpfs, healthchecks, depends_on, the volume
and AOF) is compose.yaml's own.
"""

from __future__ import annotations

import copy
import functools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fastapi_redis_mini_harness.ports import free_port

from ..support import REPO_ROOT
from ..support.docker import (
    IMAGE_USER,
    BuiltImage,
    compose_command,
    docker,
    in_ci,
    redis_standin_image,
    report,
    run_command,
    skip_module_without_engine,
    wait_for,
    wait_for_http,
)

pytestmark = pytest.mark.slow
skip_module_without_engine()

COMPOSE_FILE = REPO_ROOT / "compose.yaml"
COMPOSE_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def compose(docker_engine: None) -> list[str]:
    """The compose CLI: the v2 plugin if installed, else Debian's docker-compose (v1)."""
    command = compose_command()
    if command is None:
        message = (
            "neither `docker compose` nor `docker-compose` is installed "
            "(`bash tools/ci/docker-engine.sh` installs docker-compose)"
        )
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return command


def resolved_config(compose: list[str], image_tag: str) -> dict[str, Any]:
    """`compose config` of compose.yaml for images tagged `image_tag`, parsed."""
    proc = run_command(
        [*compose, "--file", str(COMPOSE_FILE), "config"],
        env={"IMAGE_TAG": image_tag},
        timeout=60,
    )
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def published_ports(service: dict[str, Any]) -> set[tuple[str, str, int]]:
    """(host address, published, target), whether compose wrote them long-form or short-form;
    the address is "" when the port is published on every interface."""
    pairs = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.add((port.get("host_ip", ""), str(port["published"]), int(port["target"])))
        else:
            host, _, published_target = str(port).rpartition(":")
            *address, published = host.rsplit(":", 1) if host.count(":") else ["", host]
            target = int(published_target.split("/", 1)[0])  # "8000/tcp"
            pairs.add((address[0] if address else "", published, target))
    return pairs


def volume_mounts(service: dict[str, Any]) -> set[tuple[str, str]]:
    """(source, target) pairs, whether compose wrote them long-form or short-form."""
    mounts = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.add((str(volume["source"]), str(volume["target"])))
        else:
            source, target = str(volume).split(":")[:2]
            mounts.add((source, target))
    return mounts


def test_compose_config_describes_hardened_api_and_worker_and_a_durable_redis(
    compose: list[str],
) -> None:
    config = resolved_config(compose, "1.2.3")
    services = config["services"]

    assert set(services) == {"api", "worker", "redis"}
    for name in ("api", "worker"):
        service = services[name]
        assert service["build"]["target"] == name
        assert Path(service["build"]["dockerfile"]).name == "Dockerfile"
        assert service["image"] == f"fastapi-redis-mini-{name}:1.2.3"
        assert service["user"] == IMAGE_USER
        assert service["read_only"] is True
        assert "/tmp" in service["tmpfs"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    # Loopback only: the stack runs without API keys.
    assert published_ports(services["api"]) == {("127.0.0.1", "8000", 8000)}
    assert "ports" not in services["worker"], "workers scale with --scale: no fixed host port"
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert ("redis-data", "/data") in volume_mounts(services["redis"])
    assert "redis-data" in config["volumes"]


def on_host_network(
    config: dict[str, Any], *, redis_image: str, redis_port: int, api_port: int, metrics_port: int
) -> dict[str, Any]:
    """compose.yaml's resolved services, moved onto the host network with free ports."""
    variant = copy.deepcopy(config)
    variant.pop("networks", None)
    redis_url = f"redis://redis:{redis_port}/0"
    # The api's /metrics port too: on the host network its default (9101) may be taken.
    ports = {
        "api": {"PORT": str(api_port), "API_METRICS_PORT": str(free_port())},
        "worker": {"METRICS_PORT": str(metrics_port)},
    }
    for name, service in variant["services"].items():
        service.pop("ports", None)
        service.pop("networks", None)
        service["network_mode"] = "host"
        service["restart"] = "no"
        # Same checks, polled faster so the test need not wait out the default interval.
        service["healthcheck"]["interval"] = "1s"
        if name in ports:
            service["extra_hosts"] = ["redis:127.0.0.1"]
            service["environment"].update(REDIS_URL=redis_url, HOST="127.0.0.1", **ports[name])
    redis = variant["services"]["redis"]
    redis["image"] = redis_image
    redis["command"] = [*redis["command"], "--port", str(redis_port), "--bind", "127.0.0.1"]
    redis["healthcheck"]["test"] = ["CMD", "redis-cli", "-p", str(redis_port), "ping"]
    return variant


@pytest.fixture
def compose_stack(
    compose: list[str], images: dict[str, BuiltImage], tmp_path: Path
) -> Iterator[tuple[list[str], int]]:
    """The stack up (detached) under its own project name; down with its volume afterwards."""
    api_port = free_port()
    image_tag = images["api"].tag.rpartition(":")[2]
    variant = on_host_network(
        resolved_config(compose, image_tag),
        redis_image=redis_standin_image(),
        redis_port=free_port(),
        api_port=api_port,
        metrics_port=free_port(),
    )
    path = tmp_path / "compose.host-network.yaml"
    path.write_text(yaml.safe_dump(variant, sort_keys=False))
    project = [*compose, "--project-name", f"frm-test-{uuid.uuid4().hex[:8]}", "--file", str(path)]
    started = time.monotonic()
    try:
        run_command([*project, "up", "--detach", "--no-build"], timeout=COMPOSE_TIMEOUT)
        report(f"compose up (host network): {time.monotonic() - started:.1f} s")
        yield project, api_port
    finally:
        # Captured output: pytest shows it only if the test failed.
        logs = run_command([*project, "logs", "--no-color"], check=False, timeout=60)
        print(f"--- compose logs ---\n{logs.stdout[-6000:]}")
        run_command([*project, "down", "--volumes", "--timeout", "30"], timeout=COMPOSE_TIMEOUT)


def service_container(project: list[str], service: str) -> str:
    container_id = run_command([*project, "ps", "-q", service], timeout=60).stdout.strip()
    assert container_id, f"compose runs no {service} container"
    return container_id


def healthy(container: str) -> bool | None:
    status = docker("inspect", "--format", "{{.State.Health.Status}}", container).strip()
    return True if status == "healthy" else None


def test_compose_stack_turns_healthy_serves_docs_completes_a_task_and_keeps_redis_in_aof(
    compose_stack: tuple[list[str], int],
) -> None:
    project, api_port = compose_stack
    base = f"http://127.0.0.1:{api_port}"
    wait_for_http(f"{base}/healthz", timeout=90.0)
    for service in ("api", "worker"):
        container = service_container(project, service)
        # A slow start may log failed checks first; the service must end up healthy.
        wait_for(
            functools.partial(healthy, container),
            timeout=60.0,
            what=f"compose.yaml's {service} healthcheck to pass",
        )
    assert httpx.get(f"{base}/docs", timeout=5.0).status_code == 200

    submitted = httpx.post(f"{base}/tasks", json={"prompt": "compose", "params": {}}, timeout=10)
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]

    def finished() -> str | None:
        response = httpx.get(f"{base}/tasks/{task_id}", params={"wait": 2}, timeout=10)
        status = str(response.json()["status"])
        return status if status in {"DONE", "FAILED", "CANCELLED"} else None

    assert wait_for(finished, timeout=60.0, what=f"task {task_id} finished") == "DONE"
    redis_files = docker("exec", service_container(project, "redis"), "ls", "/data").split()
    assert {"appendonlydir", "appendonly.aof"} & set(redis_files), redis_files

    worker = service_container(project, "worker")
    run_command([*project, "stop", "worker"], timeout=COMPOSE_TIMEOUT)
    assert docker("inspect", "--format", "{{.State.ExitCode}}", worker).strip() == "0"
