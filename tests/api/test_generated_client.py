"""The OpenAPI document as a new user meets it: a client generated from /openapi.json by
openapi-python-client, driven against a real api and worker.

The generated client refuses any status the document does not declare
(`raise_on_unexpected_status`), and parses every answer with the declared model, so each
step below checks the document as much as the api.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_cluster import RedisCluster
from fastapi_redis_mini_harness.redis_server import RedisServer

pytestmark = pytest.mark.slow

API_KEY = "generated-client-key"
MAX_BODY_BYTES = 4096
MAX_BACKLOG = 2
PACKAGE = "frm_generated_client"
TIMEOUT = httpx.Timeout(30.0)


@dataclass
class Generated:
    """The generated package, imported, and the api and worker it talks to."""

    package: ModuleType
    api: Process
    worker: Process
    directory: Path

    def module(self, name: str) -> Any:
        return importlib.import_module(f"{PACKAGE}.{name}")

    def client(self, *, authenticated: bool = True, api: Process | None = None) -> Any:
        base_url = (api or self.api).base_url
        if authenticated:
            return self.package.AuthenticatedClient(
                base_url=base_url, token=API_KEY, timeout=TIMEOUT, raise_on_unexpected_status=True
            )
        return self.package.Client(
            base_url=base_url, timeout=TIMEOUT, raise_on_unexpected_status=True
        )

    def task(self, prompt: str, **params: object) -> Any:
        models = self.module("models")
        return models.TaskCreate(prompt=prompt, params=models.TaskCreateParams.from_dict(params))


def generate(openapi: bytes, directory: Path) -> Path:
    """Run openapi-python-client on the document; it formats its output with ruff from PATH."""
    document = directory / "openapi.json"
    document.write_bytes(openapi)
    output = directory / PACKAGE
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [
            str(bin_dir / "openapi-python-client"),
            "generate",
            "--path",
            str(document),
            "--meta",
            "none",
            "--output-path",
            str(output),
            "--fail-on-warning",
        ],
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return output


def load(package_dir: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        PACKAGE, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    assert spec is not None
    assert spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    return package


@pytest.fixture(scope="module")
def generated(
    redis_backend: RedisServer | RedisCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Generated]:
    redis_backend.flush()
    env = {"API_KEYS": API_KEY, "MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    api = start_api(redis_backend.url, env, MAX_BACKLOG=str(MAX_BACKLOG))
    worker = None
    try:
        worker = start_worker(redis_backend.url)
        openapi = httpx.get(api.base_url + "/openapi.json", timeout=10).content
        package_dir = generate(openapi, tmp_path_factory.mktemp("generated"))
        yield Generated(load(package_dir), api, worker, package_dir)
    finally:
        for name in [name for name in sys.modules if name.partition(".")[0] == PACKAGE]:
            del sys.modules[name]
        if worker is not None:
            worker.close()
        api.close()


def test_the_calls_and_models_carry_the_names_of_the_operations_and_schemas(
    generated: Generated,
) -> None:
    calls = {
        f"{path.parent.name}.{path.stem}"
        for path in (generated.directory / "api").glob("*/*.py")
        if path.stem != "__init__"
    }
    assert calls == {
        "tasks.submit_task",
        "tasks.get_task",
        "tasks.cancel_task",
        "tasks.task_events",
        "operations.healthz",
        "operations.readyz",
    }
    assert set(generated.module("models").__all__) == {
        "ErrorBody",
        "ErrorResponse",
        "Health",
        "HealthDetail",
        "HealthDetailPartitionsType0",
        "Priority",
        "TaskCreate",
        "TaskCreateParams",
        "Task",
        "TaskStatus",
        "TaskSubmitted",
        "WebhookEvent",
    }


def test_submit_wait_and_a_cache_hit(generated: Generated) -> None:
    submit_task = generated.module("api.tasks.submit_task")
    get_task = generated.module("api.tasks.get_task")
    models = generated.module("models")
    with generated.client() as client:
        queued = submit_task.sync_detailed(client=client, body=generated.task("a b c"))
        assert queued.status_code == 202
        assert isinstance(queued.parsed, models.TaskSubmitted)
        assert queued.parsed.status == models.TaskStatus.PENDING
        task_id = queued.parsed.task_id

        done = get_task.sync_detailed(task_id, client=client, wait=20.0)
        assert done.status_code == 200
        assert isinstance(done.parsed, models.Task)
        assert done.parsed.status == models.TaskStatus.DONE
        assert done.parsed.result["output"].endswith("c b a")

        hit = submit_task.sync_detailed(client=client, body=generated.task("a b c"))
        assert hit.status_code == 200
        assert isinstance(hit.parsed, models.TaskSubmitted)
        assert (hit.parsed.status, hit.parsed.cached) == (models.TaskStatus.DONE, True)
        assert hit.parsed.result == done.parsed.result
        assert hit.parsed.task_id == task_id  # a hit names the task that computed the result


def test_cancel_of_a_running_task(generated: Generated) -> None:
    submit_task = generated.module("api.tasks.submit_task")
    get_task = generated.module("api.tasks.get_task")
    cancel_task = generated.module("api.tasks.cancel_task")
    models = generated.module("models")
    with generated.client() as client:
        body = generated.task("stop me", duration=20)
        task_id = submit_task.sync(client=client, body=body).task_id
        deadline = time.monotonic() + 15
        while get_task.sync(task_id, client=client).status != models.TaskStatus.RUNNING:
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.1)

        cancelled = cancel_task.sync_detailed(task_id, client=client)
        assert cancelled.status_code == 202
        assert isinstance(cancelled.parsed, models.Task)
        assert cancelled.parsed.cancel_requested is True

        final = get_task.sync(task_id, client=client, wait=15.0)
        assert final.status == models.TaskStatus.CANCELLED
        again = cancel_task.sync_detailed(task_id, client=client)
        assert again.status_code == 409
        assert again.parsed.error.code == "conflict"


def test_scheduling_fields_coalescing_and_expiry(generated: Generated) -> None:
    submit_task = generated.module("api.tasks.submit_task")
    get_task = generated.module("api.tasks.get_task")
    models = generated.module("models")
    params = models.TaskCreateParams.from_dict({"duration": 1})
    with generated.client() as client:
        body = models.TaskCreate(prompt="one of two", params=params, priority=models.Priority.LOW)
        first = submit_task.sync(client=client, body=body)
        second = submit_task.sync_detailed(client=client, body=body)
        assert second.status_code == 202
        assert (second.parsed.task_id, second.parsed.coalesced) == (first.task_id, True)
        assert get_task.sync(first.task_id, client=client).priority == models.Priority.LOW

        # Due in 5 s, and given 1 µs from then to start: a start comes at least one Redis
        # round trip after the task is handed out, which is no sooner than it is due, so the
        # worker always finds it expired.
        late = models.TaskCreate(prompt="too late", delay_seconds=5, deadline_seconds=0.000001)
        task_id = submit_task.sync(client=client, body=late).task_id
        waiting = get_task.sync(task_id, client=client)
        assert waiting.status == models.TaskStatus.PENDING
        assert waiting.run_at > time.time() + 3
        assert waiting.deadline_at == pytest.approx(waiting.run_at, abs=0.001)
        expired = get_task.sync(task_id, client=client, wait=10.0)
        assert expired.status == models.TaskStatus.EXPIRED


def test_error_answers_parse_as_the_documented_error(generated: Generated) -> None:
    submit_task = generated.module("api.tasks.submit_task")
    get_task = generated.module("api.tasks.get_task")
    models = generated.module("models")

    def error_of(response: Any, status: int) -> Any:
        assert response.status_code == status, response.content
        assert isinstance(response.parsed, models.ErrorResponse), response.content
        return response.parsed.error

    with generated.client(authenticated=False) as anonymous:
        refused = submit_task.sync_detailed(client=anonymous, body=generated.task("x"))
        assert error_of(refused, 401).code == "unauthorized"
    with generated.client() as client:
        missing = get_task.sync_detailed("0" * 32, client=client)
        assert error_of(missing, 404).code == "task_not_found"
        too_large = submit_task.sync_detailed(
            client=client, body=generated.task("x" * (MAX_BODY_BYTES + 1))
        )
        assert error_of(too_large, 413).code == "payload_too_large"
        negative = submit_task.sync_detailed(client=client, body=generated.task("x", duration=-1))
        assert error_of(negative, 422).message.startswith("params.duration: ")
        too_long = get_task.sync_detailed("0" * 32, client=client, wait=31.0)
        assert error_of(too_long, 422).message.startswith("wait: ")
        keyed = submit_task.sync_detailed(
            client=client, body=generated.task("x"), idempotency_key="two words"
        )
        assert error_of(keyed, 422).message.startswith("Idempotency-Key: ")


def test_a_key_over_its_submit_rate_gets_a_429(
    generated: Generated, redis_backend: RedisServer | RedisCluster
) -> None:
    submit_task = generated.module("api.tasks.submit_task")
    limited = start_api(
        redis_backend.url,
        API_KEYS=API_KEY,
        SUBMIT_RATE_PER_KEY="0.01",
        SUBMIT_BURST_PER_KEY="1",
        KEY_PREFIX="rate:",
    )
    try:
        with generated.client(api=limited) as client:
            first = submit_task.sync_detailed(client=client, body=generated.task("one"))
            second = submit_task.sync_detailed(client=client, body=generated.task("two"))
    finally:
        limited.close()
    assert first.status_code == 202
    assert second.status_code == 429, second.content
    assert second.parsed.error.code == "rate_limited"
    assert second.headers["Retry-After"].isdigit()
    assert second.headers["RateLimit"].startswith('"submits";r=0;')


def test_a_backlog_above_max_backlog_is_a_429(generated: Generated) -> None:
    # Last in the module: it stops the worker so that submits pile up in the stream.
    submit_task = generated.module("api.tasks.submit_task")
    generated.worker.stop()
    with generated.client() as client:
        deadline = time.monotonic() + 15
        for n in range(200):
            assert time.monotonic() < deadline, "no 429 while the backlog grew"
            response = submit_task.sync_detailed(client=client, body=generated.task(f"pile {n}"))
            if response.status_code != 202:
                break
            time.sleep(0.05)
    assert response.status_code == 429, response.content
    assert response.parsed.error.code == "backlog_full"
    assert response.headers["Retry-After"].isdigit()
