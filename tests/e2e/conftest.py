from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from fastapi_redis_mini_harness.processes import Process, start_api, start_worker

from ..support import REPO_ROOT

Start = Callable[..., Process]


@pytest.fixture
def services() -> Iterator[list[Process]]:
    """Every process a test starts; all are killed at the end, whatever happened."""
    started: list[Process] = []
    yield started
    for service in started:
        service.close()


@pytest.fixture
def api(redis_url: str, services: list[Process]) -> Start:
    def start(**env: str) -> Process:
        service = start_api(redis_url, env)
        services.append(service)
        return service

    return start


@pytest.fixture
def worker(redis_url: str, services: list[Process]) -> Start:
    def start(**env: str) -> Process:
        # From the repository root, so TASK_HANDLER=tests.support.handlers:NAME imports.
        service = start_worker(redis_url, env, cwd=REPO_ROOT)
        services.append(service)
        return service

    return start
