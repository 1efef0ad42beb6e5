"""A worker whose loop meets an error it cannot handle exits non-zero; it never lingers alive.

The error is a real one: the stream's key replaced by a string, so every stream command
answers WRONGTYPE, which no retry can fix. Kubernetes restarts a container that exits; it
would leave alone a live process whose consume loop had quietly ended.
"""

from __future__ import annotations

import httpx
import pytest

from fastapi_redis_mini_harness.redis_server import RedisServer

from ._chaos import wait_until
from .conftest import Launcher

pytestmark = pytest.mark.slow

EXIT_WITHIN = 20.0  # SHUTDOWN_GRACE is 10 s in the test environment, and nothing is running


def test_a_loop_ending_unexpectedly_makes_the_worker_exit_non_zero(
    launch: Launcher, redis_server: RedisServer, redis_url: str
) -> None:
    worker = launch.worker(redis_url)
    assert httpx.get(worker.base_url + "/healthz", timeout=5).status_code == 200
    client = redis_server.client()
    client.delete("task_stream")
    client.set("task_stream", "not a stream any more")
    client.close()
    assert wait_until(lambda: worker.process.poll() is not None, EXIT_WITHIN)
    print(f"\nreliability[dead-loop]: exit status {worker.process.returncode}")
    assert worker.process.returncode not in (0, None)
    log = worker.log
    assert "the consume loop ended with ResponseError" in log
    assert "Traceback" in log  # where the loop ended, for whoever reads the log
    assert "WRONGTYPE" in log
