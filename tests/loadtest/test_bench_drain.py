"""The bench's drains on a Redis Cluster: its workers read the partitions it queued in.

The suite turns the per-key quotas off in its own environment (tests/conftest.py), which every
process it starts inherits. A shell does not, and with any quota on a cluster's queue is one
partition, with none 16: these tests take the variables away, as a shell would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fastapi_redis_mini_harness.processes import workspace
from loadtest.bench._workers import QUOTAS_OFF_ENV, drain_ours, enqueue_ours, wait_idle

pytestmark = pytest.mark.slow

TASKS = 20


@pytest.fixture
def shell_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of a shell: the service's default quotas."""
    for variable in QUOTAS_OFF_ENV:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.usefixtures("shell_environment")
def test_a_drain_on_a_cluster_is_read_by_its_workers_whatever_the_shell_sets(
    redis_cluster_url: str, tmp_path: Path
) -> None:
    with workspace(tmp_path) as space:
        run = drain_ours(space, redis_cluster_url, tasks=TASKS, concurrency=10, timeout=60)

    assert run.completed == TASKS


@pytest.mark.usefixtures("shell_environment")
async def test_waiting_for_a_drain_no_worker_reads_fails_at_once_saying_so(
    redis_cluster_url: str,
) -> None:
    await enqueue_ours(redis_cluster_url, TASKS, "unread")
    began = time.perf_counter()

    with pytest.raises(RuntimeError, match=r"no worker reads the queue: 20 tasks wait.*16 part"):
        await wait_idle(redis_cluster_url, began + 60, join_timeout=1)
    assert time.perf_counter() - began < 30
