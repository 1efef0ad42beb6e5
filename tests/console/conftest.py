"""A real api with the console on, real workers and a real Redis, for the console's tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from fastapi_redis_mini_harness.http import tls_context
from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker

from ..support import REPO_ROOT

ADMIN_KEY = "console-admin-key-0123456789"
TENANT_KEY = "tenant-key-abcdefghijklmnop"
# A worker may be told to claim a dead worker's entries after this many seconds idle.
CLAIM_IDLE = "2"


@dataclass
class Console:
    api: Process
    started: list[Process]
    redis_url: str

    @property
    def url(self) -> str:
        return self.api.base_url

    def worker(self, **env: str) -> Process:
        """Start a worker; from the repository root, so tests.support.handlers imports."""
        process = start_worker(self.redis_url, {"CLAIM_IDLE": CLAIM_IDLE, **env}, cwd=REPO_ROOT)
        self.started.append(process)
        return process

    def tenant(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {TENANT_KEY}"},
            timeout=10,
            verify=tls_context(),
        )

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=10,
            verify=tls_context(),
        )

    def submit(self, prompt: str, **params: object) -> str:
        with self.tenant() as client:
            answer = client.post("/tasks", json={"prompt": prompt, "params": params})
        assert answer.status_code == 202, answer.text
        task_id: str = answer.json()["task_id"]
        return task_id

    def status(self, task_id: str) -> str:
        with self.tenant() as client:
            status: str = client.get(f"/tasks/{task_id}").json()["status"]
        return status

    def wait_for(self, task_id: str, status: str, timeout: float = 30) -> None:
        poll(lambda: self.status(task_id) == status, timeout=timeout,
             what=f"task {task_id} never became {status}")  # fmt: skip


@pytest.fixture
def console(redis_url: str, request: pytest.FixtureRequest) -> Iterator[Console]:
    """The api with the console on; a test parametrized indirectly adds settings to it."""
    extra: dict[str, str] = getattr(request, "param", {})
    started: list[Process] = []
    api = start_api(
        redis_url,
        {"CONSOLE_ENABLED": "true", "ADMIN_API_KEY": ADMIN_KEY, "API_KEYS": TENANT_KEY, **extra},
    )
    started.append(api)
    try:
        yield Console(api=api, started=started, redis_url=redis_url)
    finally:
        for process in reversed(started):
            process.close()
