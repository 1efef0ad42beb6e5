"""DELETE /tasks/{id}: at once when PENDING, cooperative when RUNNING, 409 when final."""

from __future__ import annotations

import time

import httpx
import pytest

from ._chaos import wait_until, worker_figures_once_counted
from .conftest import Launcher

pytestmark = pytest.mark.slow

CLAIM_IDLE = 3.0  # the worker checks for cancel requests every CLAIM_IDLE/3


def test_cancel_semantics_for_pending_running_and_finished_tasks(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(redis_url)
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        pending_id = client.post("/tasks", json={"prompt": "never runs"}).json()["task_id"]
        cancelled = client.delete(f"/tasks/{pending_id}")

        worker = launch.worker(redis_url, CLAIM_IDLE=str(CLAIM_IDLE))
        running_id = client.post(
            "/tasks", json={"prompt": "runs long", "params": {"duration": 25}}
        ).json()["task_id"]
        assert wait_until(
            lambda: client.get(f"/tasks/{running_id}").json()["status"] == "RUNNING", 20
        )
        requested = client.delete(f"/tasks/{running_id}")
        asked_at = time.monotonic()
        assert wait_until(
            lambda: client.get(f"/tasks/{running_id}").json()["status"] == "CANCELLED", 20, 0.05
        )
        noticed_in = time.monotonic() - asked_at

        done_id = client.post("/tasks", json={"prompt": "quick"}).json()["task_id"]
        assert client.get(f"/tasks/{done_id}?wait=10").json()["status"] == "DONE"
        conflict = client.delete(f"/tasks/{done_id}")
        again = client.delete(f"/tasks/{pending_id}")

        never_ran = client.get(f"/tasks/{pending_id}").json()
        stopped = client.get(f"/tasks/{running_id}").json()
    [figures] = worker_figures_once_counted([worker], done=1)
    print(
        f"\nreliability[cancel]: pending->{cancelled.json()['status']} "
        f"running->CANCELLED in {noticed_in:.2f}s (CLAIM_IDLE/3={CLAIM_IDLE / 3:g}s) "
        f"done->{conflict.status_code}"
    )
    assert (cancelled.status_code, cancelled.json()["status"]) == (202, "CANCELLED")
    assert never_ran["status"] == "CANCELLED"
    assert (never_ran["attempts"], never_ran["started_at"]) == (0, None)
    assert (requested.status_code, requested.json()["status"]) == (202, "RUNNING")
    assert requested.json()["cancel_requested"] is True
    assert noticed_in < CLAIM_IDLE / 3 + 1.5
    assert (stopped["error"], stopped["attempts"]) == ("cancelled while running", 1)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"
    assert again.status_code == 409
    assert figures["done"] == 1
