from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ..support.processes import Service, start_api, start_worker

Start = Callable[..., Service]


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Every process a test starts; all are killed at the end, whatever happened."""
    started: list[Service] = []
    yield started
    for service in started:
        service.close()


@pytest.fixture
def api(redis_url: str, services: list[Service]) -> Start:
    def start(**env: str) -> Service:
        service = start_api(redis_url, env)
        services.append(service)
        return service

    return start


@pytest.fixture
def worker(redis_url: str, services: list[Service]) -> Start:
    def start(**env: str) -> Service:
        service = start_worker(redis_url, env)
        services.append(service)
        return service

    return start
