from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping

import pytest

from fastapi_redis_mini_harness.processes import Process, start_api, start_worker

from ..support import REPO_ROOT


class Launcher:
    """Starts api and worker processes and remembers them, so each is killed after the test."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def api(
        self,
        redis_url: str,
        env: Mapping[str, str] | None = None,
        *,
        wait: bool = True,
        **more: str,
    ) -> Process:
        service = start_api(redis_url, {**(env or {}), **more}, wait=False)
        self.started.append(service)
        if wait:
            service.wait_until_answers("/readyz", timeout=40)
        return service

    def worker(
        self,
        redis_url: str,
        env: Mapping[str, str] | None = None,
        *,
        wait: bool = True,
        **more: str,
    ) -> Process:
        # From the repository root, so TASK_HANDLER=tests.support.handlers:NAME imports.
        service = start_worker(redis_url, {**(env or {}), **more}, wait=False, cwd=REPO_ROOT)
        self.started.append(service)
        if wait:
            service.wait_until_answers("/healthz", timeout=40)
        return service

    def workers(self, redis_url: str, count: int, **env: str) -> list[Process]:
        """Start several at once: on two cores their imports overlap instead of queueing."""
        services = [self.worker(redis_url, env, wait=False) for _ in range(count)]
        for service in services:
            service.wait_until_answers("/healthz", timeout=40)
        return services

    def close(self) -> None:
        for service in self.started:
            service.close()


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture
def launch(request: pytest.FixtureRequest) -> Iterator[Launcher]:
    launcher = Launcher()
    yield launcher
    if request.node.stash.get(_FAILED, False):
        # What each process said is the first thing to read when a chaos test fails in CI.
        for service in launcher.started:
            print(f"\n----- {service.name} (pid {service.pid}) log, last 60 lines -----")
            print("\n".join(service.log.splitlines()[-60:]))
    launcher.close()
