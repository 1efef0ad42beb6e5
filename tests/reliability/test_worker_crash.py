"""A worker dies with tasks in hand (SIGKILL), or runs tasks longer than CLAIM_IDLE."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from ._chaos import (
    Tally,
    collect,
    in_flight,
    submit_all,
    wait_until,
    worker_figures,
    worker_figures_once_counted,
)
from .conftest import Launcher

pytestmark = pytest.mark.slow

CLAIM_IDLE = "2"


def test_sigkill_mid_task_loses_nothing_and_completes_nothing_twice(
    redis_url: str, launch: Launcher
) -> None:
    concurrency, count = 8, 24
    api = launch.api(redis_url)
    victim = launch.worker(redis_url, MAX_CONCURRENCY=str(concurrency), CLAIM_IDLE=CLAIM_IDLE)
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        bodies = [{"prompt": f"crash {i}", "params": {"duration": 3.0}} for i in range(count)]
        ids = submit_all(client, bodies)
        assert wait_until(lambda: in_flight(victim) == concurrency, 20), victim.log
        # Tasks take 3 s and the victim started its first a moment ago: it has finished none.
        assert worker_figures(victim)["done"] == 0
        victim.kill()
        killed_at = time.monotonic()
        survivors = launch.workers(redis_url, 2, MAX_CONCURRENCY="8", CLAIM_IDLE=CLAIM_IDLE)
        tasks = collect(client, ids, timeout=60)
        recovered_in = time.monotonic() - killed_at

    figures = worker_figures_once_counted(survivors, done=count)
    tally = Tally.of(tasks)
    attempts = Counter(task["attempts"] for task in tasks.values())
    tally.report(
        "sigkill",
        held_by_victim=concurrency,
        reclaimed=sum(f["reclaimed"] for f in figures),
        done_per_survivor=[f["done"] for f in figures],
        attempts=dict(attempts),
        all_done_after_kill_s=round(recovered_in, 1),
    )
    assert tally.lost == 0
    assert tally.done == count
    # Every DONE was written exactly once: the survivors' own counts add up to the tasks.
    assert sum(f["done"] for f in figures) == count
    assert sum(f["reclaimed"] for f in figures) == concurrency
    # The victim's tasks ran a second time; no other task ran more than once.
    assert attempts == Counter({1: count - concurrency, 2: concurrency})


def test_a_task_running_past_claim_idle_on_a_live_worker_is_not_stolen(
    redis_url: str, launch: Launcher
) -> None:
    # Each task runs for over twice CLAIM_IDLE. The owner renews its entries every CLAIM_IDLE/3,
    # so a renewal may come 3 s late on a loaded machine before a thief could take one.
    claim_idle, count, duration = "5", 4, 12.0
    api = launch.api(redis_url)
    owner = launch.worker(redis_url, MAX_CONCURRENCY=str(count), CLAIM_IDLE=claim_idle)
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        bodies = [{"prompt": f"long {i}", "params": {"duration": duration}} for i in range(count)]
        ids = submit_all(client, bodies)
        assert wait_until(lambda: in_flight(owner) == count, 20), owner.log
        # An idle worker looks for entries idle longer than CLAIM_IDLE every CLAIM_IDLE/2.
        thief = launch.worker(redis_url, MAX_CONCURRENCY=str(count), CLAIM_IDLE=claim_idle)
        tasks = collect(client, ids, timeout=60)

    owner_figures, thief_figures = worker_figures_once_counted([owner, thief], done=count)
    tally = Tally.of(tasks)
    tally.report(
        "not-stolen",
        task_seconds=duration,
        claim_idle_s=claim_idle,
        attempts=dict(Counter(task["attempts"] for task in tasks.values())),
        owner_done=owner_figures["done"],
        thief_reclaimed=thief_figures["reclaimed"],
    )
    assert tally.lost == 0
    assert all(task["status"] == "DONE" and task["attempts"] == 1 for task in tasks.values())
    assert thief_figures["reclaimed"] == 0
    assert (owner_figures["done"], thief_figures["done"]) == (count, 0)


def test_workers_killed_one_after_another_under_load_lose_nothing(
    redis_url: str, launch: Launcher
) -> None:
    kills = 4
    # A task may be in flight at every kill; with more deliveries allowed than kills, each
    # crash costs it a delivery but can never dead-letter it.
    env = {"MAX_CONCURRENCY": "10", "CLAIM_IDLE": CLAIM_IDLE, "MAX_DELIVERIES": str(kills + 2)}
    api = launch.api(redis_url, WEB_CONCURRENCY="2")
    workers = launch.workers(redis_url, 3, **env)
    accepted: list[str] = []
    refused: list[str] = []  # the load thread's failures, asserted here: a thread cannot fail
    stop = threading.Event()

    def submit_until_stopped() -> None:
        # Short tasks, 20 submitted a second: a few are in flight at every kill. Each one a
        # kill takes over is a suspect that its next worker runs alone, one claim scan
        # (CLAIM_IDLE/2) after another, so every task in flight at a kill costs about 1 s.
        durations = [0.05, 0.1, 0.2, 0.4]
        with httpx.Client(base_url=api.base_url, timeout=15) as client:
            for n in range(2000):
                if stop.is_set():
                    return
                body = {"prompt": f"storm {n}", "params": {"duration": durations[n % 4]}}
                try:
                    response = client.post("/tasks", json=body)
                except httpx.HTTPError as error:
                    refused.append(f"submit {n}: {error!r}")
                    return
                if response.status_code != 202:
                    refused.append(f"submit {n}: {response.status_code} {response.text}")
                    return
                accepted.append(response.json()["task_id"])
                time.sleep(0.05)

    load = threading.Thread(target=submit_until_stopped, daemon=True)
    load.start()
    try:
        for round_ in range(kills):  # every 3 s a worker dies mid-task and a new one starts
            time.sleep(3.0)
            victim = workers.pop(round_ % len(workers))
            victim.kill()
            workers.append(launch.worker(redis_url, env, wait=False))
    finally:
        stop.set()
        load.join(timeout=30)
    assert not load.is_alive(), "the load thread did not stop"
    assert refused == []
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        tasks = collect(client, accepted, timeout=90)

    tally = Tally.of(tasks)
    attempts = Counter(task["attempts"] for task in tasks.values())
    tally.report("kill-storm", kills=kills, attempts=dict(attempts))
    assert tally.lost == 0
    assert tally.done == tally.accepted > 0
