"""A Redis Cluster against a single server, in the same run (`--sections cluster`).

- worker: N no-op tasks queued, then drained by one worker process, on each;
- api: POST /tasks misses at MAX_CONNECTIONS on two apis, one per backend, taking turns;
- memory: N tasks through the api with a worker on the cluster, then every master's
  used_memory and key count.

The cluster is three masters with a replica each, all on this machine's loopback (the
harness's RedisCluster), so its six servers share the cores with the api and the worker:
what a cluster buys on one machine is where the memory goes, not speed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from fastapi_redis_mini_harness.processes import Workspace
from fastapi_redis_mini_harness.redis_cluster import RedisCluster
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._api import measure_post_misses, start_ours
from ._e2e import miss_requests
from ._http import send_all
from ._workers import drain_ours, spawn_worker, wait_idle, wait_worker_ready

SUBMIT_CONNECTIONS = 100


def master_memory(cluster: RedisCluster) -> dict[str, dict[str, int]]:
    """used_memory and the key count of every master, by address."""
    roles = cluster.roles()
    found: dict[str, dict[str, int]] = {}
    for node in cluster.nodes:
        if roles[node.port] != "master":
            continue
        client = node.client()
        try:
            info: dict[str, Any] = client.info("memory")
            keys = int(client.dbsize())
        finally:
            client.close()
        found[f"127.0.0.1:{node.port}"] = {"used_memory": int(info["used_memory"]), "keys": keys}
    return found


def _workers(
    space: Workspace, standalone: RedisServer, cluster: RedisCluster, args: argparse.Namespace
) -> dict[str, Any]:
    runs = {}
    for name, url, flush in (
        ("standalone", standalone.url, standalone.flush),
        ("cluster", cluster.url, cluster.flush),
    ):
        flush()
        runs[name] = drain_ours(
            space,
            url,
            tasks=args.tasks,
            concurrency=args.concurrency,
            label=f"cluster-section-{name}",
            log_level=args.worker_log_level,
        ).as_dict()
    standalone_rate = runs["standalone"]["drain_rate"]
    return {
        "runs": runs,
        "rate_ratio": runs["cluster"]["drain_rate"] / standalone_rate if standalone_rate else 0.0,
    }


def _api(
    space: Workspace, standalone: RedisServer, cluster: RedisCluster, args: argparse.Namespace
) -> dict[str, Any]:
    standalone.flush()
    cluster.flush()
    servers = {
        "standalone": start_ours(space, standalone.url, args.api_workers, name="api-standalone"),
        "cluster": start_ours(space, cluster.url, args.api_workers, name="api-cluster"),
    }
    try:
        return measure_post_misses(
            servers, args.api_seconds, args.api_rounds, ratio_of=("cluster", "standalone")
        )
    finally:
        for server in servers.values():
            server.stop()


def _memory(space: Workspace, cluster: RedisCluster, args: argparse.Namespace) -> dict[str, Any]:
    cluster.flush()
    api = start_ours(space, cluster.url, args.api_workers, name="api-cluster-memory")
    worker = spawn_worker(space, cluster.url, args.concurrency, "worker-cluster-memory")
    try:
        wait_worker_ready(worker)
        before = master_memory(cluster)
        requests = miss_requests(api.port, args.cluster_memory_tasks, "cluster-memory")
        answers = asyncio.run(send_all("127.0.0.1", api.port, requests, SUBMIT_CONNECTIONS))
        accepted = sum(1 for status, _ in answers if status == 202)
        asyncio.run(wait_idle(cluster.url, time.perf_counter() + 600))
    finally:
        worker.stop()
        api.stop()
    after = master_memory(cluster)
    grown = sum(
        a["used_memory"] - before[n]["used_memory"] for n, a in after.items() if n in before
    )
    return {
        "tasks": accepted,
        "before": before,
        "after": after,
        "redis_bytes_per_task": grown / max(1, accepted),
    }


def cluster_versus_standalone(
    space: Workspace, standalone: RedisServer, args: argparse.Namespace
) -> dict[str, Any]:
    cluster = RedisCluster()
    try:
        cluster.start()
        return {
            "server": cluster.kind,
            "masters": cluster.masters,
            "replicas_per_master": cluster.replicas_per_master,
            "worker": _workers(space, standalone, cluster, args),
            "api": _api(space, standalone, cluster, args),
            "memory": _memory(space, cluster, args),
        }
    finally:
        cluster.close()
