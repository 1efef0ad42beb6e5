"""Scale-out (`--sections scaleout`): a Redis Cluster of 3 masters against one of 1 master,
with every Redis node capped at the same share of a core, so that Redis is the limit.

On one two-core machine six uncapped servers only take turns on the same cores (the
`cluster` section), so adding masters cannot show. Here each node runs in its own cgroup
(harness `cgroups.CpuCap`, cgroup v1 CFS quota) at `--scaleout-cap` cores: 1 master gets that
much CPU in all, 3 masters three times as much, and the clients (several worker processes,
an api with several gunicorn workers) need far less than the cores left to them.

Both backends are clusters, so the service runs the same client code on both: the cluster
client, 16 queue partitions (the cluster default), one script call per partition. Only
where the partitions' slots live differs: all on one master, or spread over three. No
replicas, so each master's CPU goes to the service's commands only.

- drain: N no-op tasks queued with the caps lifted, then drained under the caps by
  `--scaleout-workers` worker processes; rounds alternate the order of the backends.
- api: POST /tasks misses at `--scaleout-connections` on two apis, one per backend, in
  alternating rounds, every node capped.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi_redis_mini_harness.cgroups import CpuCap, Throttling, unavailable
from fastapi_redis_mini_harness.processes import Workspace
from fastapi_redis_mini_harness.redis_cluster import RedisCluster

from ._api import measure_post_misses, start_ours
from ._workers import drain_ours

MASTERS = (1, 3)


def _name(masters: int) -> str:
    return f"{masters} master" + ("s" if masters > 1 else "")


class CappedCluster:
    """A started cluster of `masters` masters, each node in its own CPU group (uncapped
    until `capped()`)."""

    def __init__(self, masters: int, cores: float, period_us: int, stack: contextlib.ExitStack):
        self.name = _name(masters)
        self.cores = cores
        self.cluster = RedisCluster(masters=masters, replicas_per_master=0)
        stack.callback(self.cluster.close)
        self.cluster.start()
        self.caps: list[CpuCap] = []
        for node in self.cluster.nodes:
            cap = stack.enter_context(
                CpuCap(f"frm-bench-{masters}m-{node.port}", None, period_us=period_us)
            )
            assert node.process is not None
            cap.add(node.process.pid)
            self.caps.append(cap)
        self.throttled: list[Throttling] = []

    @property
    def url(self) -> str:
        return self.cluster.url

    @contextlib.contextmanager
    def capped(self) -> Iterator[None]:
        """Every node at `cores` inside; what the caps throttled is kept in `throttled`."""
        for cap in self.caps:
            cap.set(self.cores)
        before = [cap.throttling() for cap in self.caps]
        try:
            yield
        finally:
            self.throttled = [
                cap.throttling().since(b) for cap, b in zip(self.caps, before, strict=True)
            ]
            for cap in self.caps:
                cap.set(None)

    def throttled_share(self) -> float:
        """Over the last capped stretch: the share of active periods that hit the quota."""
        periods = sum(t.periods for t in self.throttled)
        return sum(t.throttled_periods for t in self.throttled) / periods if periods else 0.0


def _drains(
    space: Workspace, clusters: dict[int, CappedCluster], args: argparse.Namespace
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in clusters.values()}
    order = list(clusters.values())
    for n in range(args.scaleout_rounds):
        for backend in order if n % 2 == 0 else order[::-1]:
            backend.cluster.flush()
            run = drain_ours(
                space,
                backend.url,
                tasks=args.scaleout_tasks,
                concurrency=args.concurrency,
                processes=args.scaleout_workers,
                label=f"scaleout-{backend.name.replace(' ', '')}-{n}",
                log_level=args.worker_log_level,
                during=backend.capped(),
            ).as_dict()
            run["redis_throttled_share"] = backend.throttled_share()
            runs[backend.name].append(run)
    one, three = (clusters[m].name for m in MASTERS)
    pairs = zip(runs[one], runs[three], strict=True)
    ratios = [_ratio(b["drain_rate"], a["drain_rate"]) for a, b in pairs]
    median = _median_index(ratios)
    return {
        "rounds": ratios,
        "ratio": ratios[median],
        "runs": {name: each[median] for name, each in runs.items()},
        "all_runs": runs,
    }


def _posts(
    space: Workspace, clusters: dict[int, CappedCluster], args: argparse.Namespace
) -> dict[str, Any]:
    servers = {}
    for backend in clusters.values():
        backend.cluster.flush()
        servers[backend.name] = start_ours(
            space,
            backend.url,
            args.scaleout_api_workers,
            name=f"api-scaleout-{backend.name.replace(' ', '')}",
        )
    try:
        with contextlib.ExitStack() as caps:
            for backend in clusters.values():
                caps.enter_context(backend.capped())
            one, three = (clusters[m].name for m in MASTERS)
            result = measure_post_misses(
                servers,
                args.api_seconds,
                args.scaleout_rounds,
                ratio_of=(three, one),
                connections=args.scaleout_connections,
            )
        result["redis_throttled_share"] = {
            backend.name: backend.throttled_share() for backend in clusters.values()
        }
        return result
    finally:
        for server in servers.values():
            server.stop()


def scale_out(space: Workspace, args: argparse.Namespace) -> dict[str, Any]:
    """Drain and POST-miss rates of 1 against 3 capped masters; skipped, with the reason,
    where no cgroup can be made."""
    reason = unavailable()
    if reason is not None:
        return {"skipped": reason}
    with contextlib.ExitStack() as stack:
        clusters = {
            m: CappedCluster(m, args.scaleout_cap, args.scaleout_period_us, stack) for m in MASTERS
        }
        return {
            "server": clusters[1].cluster.kind,
            "cap_cores": args.scaleout_cap,
            "period_us": args.scaleout_period_us,
            "worker_processes": args.scaleout_workers,
            "concurrency": args.concurrency,
            "api_workers": args.scaleout_api_workers,
            "tasks": args.scaleout_tasks,
            "drain": _drains(space, clusters, args),
            "api": _posts(space, clusters, args),
            "cgroups": [str(cap.path) for c in clusters.values() for cap in c.caps],
        }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _median_index(values: Sequence[float]) -> int:
    """The index of the median value (the lower middle one for an even count)."""
    ordered = sorted(range(len(values)), key=lambda i: values[i])
    return ordered[(len(ordered) - 1) // 2]
