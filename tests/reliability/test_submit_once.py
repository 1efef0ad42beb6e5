"""Each submit is stored once, even when the Redis client sends its script a second time."""

from __future__ import annotations

import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fastapi_redis_mini_harness.redis_server import RedisServer

from .conftest import Launcher

pytestmark = pytest.mark.slow

# Longer than REDIS_SOCKET_TIMEOUT (2 s), so the client times the script out and sends it
# again while the first copy still waits, unread, in the frozen server; shorter than the
# timeout plus the retry (about 4 s), so the submit still gets its answer.
FREEZE_SECONDS = 3.0
SUBMITS = 6


def test_a_submit_retried_across_a_redis_freeze_is_stored_once(launch: Launcher) -> None:
    server = RedisServer()
    server.start()
    assert server.process is not None
    try:
        # No worker: every entry stays in the stream to be counted.
        api = launch.api(server.url, WEB_CONCURRENCY="1")
        with (
            httpx.Client(base_url=api.base_url, timeout=20) as client,
            ThreadPoolExecutor(SUBMITS) as pool,
        ):
            # One submit first, so the script is loaded: a script Redis does not know yet
            # fails with NOSCRIPT instead of running, and so would hide the double run.
            assert client.post("/tasks", json={"prompt": "before"}).status_code == 202
            with server.client() as redis_client:
                connections_before = redis_client.info("stats")["total_connections_received"]
            server.process.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            answers = [
                pool.submit(client.post, "/tasks", json={"prompt": f"freeze {n}"})
                for n in range(SUBMITS)
            ]
            time.sleep(max(0.0, FREEZE_SECONDS - (time.monotonic() - frozen_at)))
            server.process.send_signal(signal.SIGCONT)
            responses = [future.result() for future in answers]
            answered_after = round(time.monotonic() - frozen_at, 1)
        with server.client() as redis_client:
            entries = redis_client.xrange("task_stream")
            hashes = len(redis_client.keys("task:*"))
            # Minus this client's own: each other new connection is the api sending again.
            reconnects = redis_client.info("stats")["total_connections_received"] - (
                connections_before + 1
            )
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.close()
    statuses = Counter(response.status_code for response in responses)
    accepted = [r.json()["task_id"] for r in responses if r.status_code == 202]
    per_task = Counter(fields["task_id"] for _, fields in entries)
    print(
        f"\nreliability[submit-once-freeze]: answers={dict(statuses)} accepted={len(accepted)} "
        f"stream_entries={len(entries)} task_hashes={hashes} "
        f"entries_per_task={dict(Counter(per_task.values()))} answered_after_s={answered_after} "
        f"api_reconnects={reconnects}"
    )
    assert "Traceback" not in api.log
    # The api did time out and send its script again, and still stored each submit once.
    assert reconnects > 0
    assert statuses[202] > 0
    assert set(statuses) <= {202, 503}, statuses
    assert all(count == 1 for count in per_task.values()), per_task
    assert set(accepted) <= set(per_task)
    assert len(entries) == hashes
