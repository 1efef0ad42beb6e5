"""The api and a worker as real processes on a real Redis Cluster, found with REDIS_CLUSTER=auto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from redis.crc import key_slot

from fastapi_redis_mini.core.redis.keys import Keys, Partitions
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_cluster import RedisCluster

pytestmark = pytest.mark.slow


def test_tasks_run_to_done_and_hit_the_cache_on_a_cluster(
    redis_cluster_url: str, redis_cluster: RedisCluster, services: list[Process]
) -> None:
    server = start_api(redis_cluster_url, {})
    services.append(server)
    services.append(start_worker(redis_cluster_url, {}))
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        ids = []
        for i in range(20):
            answer = client.post("/tasks", json={"prompt": f"p{i}", "params": {"duration": 0.05}})
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["task_id"])
        deadline = time.monotonic() + 30
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for task_id in list(pending):
                if client.get(f"/tasks/{task_id}").json()["status"] == "DONE":
                    pending.discard(task_id)
            time.sleep(0.1)
        assert pending == set(), f"{len(pending)} of 20 not DONE within 30 s"
        again = client.post("/tasks", json={"prompt": "p3", "params": {"duration": 0.05}})
        assert again.status_code == 200
        assert again.json()["cached"] is True
        # A cancel finds a finished task by its id (409: already final), and a long-poll on a
        # task submitted now is woken when the worker finishes it.
        assert client.delete(f"/tasks/{ids[0]}").status_code == 409
        fresh = client.post("/tasks", json={"prompt": "late", "params": {"duration": 0.2}})
        polled = client.get(f"/tasks/{fresh.json()['task_id']}", params={"wait": 20}, timeout=30)
        assert polled.json()["status"] == "DONE"

    # The admin command reads the queue through the cluster client as well.
    stats = subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.admin", "stats"],
        env={**os.environ, "REDIS_URL": redis_cluster_url},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    # Summed over the 16 partitions of a cluster's default, and shown for each.
    assert figures["stream"] == "task_stream"
    assert (figures["lag"], figures["pending"], figures["dead_letter_length"]) == (0, 0, 0)
    assert figures["stream_length"] == sum(p["stream_length"] for p in figures["partitions"])
    partitions = Partitions.from_settings(Settings(), cluster=True)
    assert [p["stream"] for p in figures["partitions"]] == [k.stream for k in partitions.all]

    # Everything the service wrote sits in the slot of one partition's hash tag, and every
    # master holds partitions: each master has its streams and some of the tasks. Only the
    # layout record is elsewhere: it is named the same whatever the layout.
    slots = {key_slot(keys.stream.encode()) for keys in partitions.all}
    layout_record = Keys.from_settings(Settings(), cluster=True).layout
    for node in redis_cluster.nodes:
        if redis_cluster.roles()[node.port] != "master":
            continue
        client_ = node.client()
        try:
            keys = [str(key) for key in client_.keys("*") if str(key) != layout_record]
            assert all(key_slot(key.encode()) in slots for key in keys), keys
            assert any(key.endswith(":task_stream") for key in keys), keys
        finally:
            client_.close()
