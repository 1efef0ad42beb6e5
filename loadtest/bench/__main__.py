"""The benchmark behind `make bench`: worker vs arq and SAQ, api vs a bare app, end to end.

    python -m loadtest.bench            # full run, a few minutes on two cores (make bench)
    python -m loadtest.bench --quick    # smaller N everywhere, for a smoke check (make bench-quick)

Prints a table, and writes bench.json and bench.md under --out (reports/bench by default).
Every server listens on 127.0.0.1 only. Only ratios from one run are claims: absolute
rates move with whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi_redis_mini_harness.processes import Process, Workspace, workspace
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._api import (
    LABELS,
    SCRIPTS,
    measure_durable_acks,
    measure_endpoint,
    start_bare,
    start_ours,
    warm_cache,
)
from ._cluster import cluster_versus_standalone
from ._e2e import end_to_end, memory_after
from ._inference import BENCH_MODULE, accelerator_ceiling, drain_run, embed_ceiling, service_run
from ._measure import ROOT, require_wrk, wrk
from ._report import print_table, targets, write_markdown
from ._scaleout import scale_out
from ._workers import PEERS, drain_ours, drain_peer, spawn_worker, wait_worker_ready

PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
SECTIONS = (
    "worker",
    "api",
    "durable",
    "e2e",
    "scale",
    "memory",
    "cluster",
    "inference",
    "scaleout",
)
Report = dict[str, Any]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small N everywhere (smoke run)")
    parser.add_argument("--tasks", type=int, help="no-op tasks per worker run [20000]")
    parser.add_argument("--concurrency", type=int, default=100, help="per worker process [100]")
    parser.add_argument("--api-workers", type=int, default=2, help="gunicorn workers [2]")
    parser.add_argument("--api-seconds", type=float, help="seconds per wrk run [3]")
    parser.add_argument(
        "--api-rounds", type=int, help="rounds of alternating api and bare runs; median kept [3]"
    )
    parser.add_argument("--e2e-tasks", type=int, help="tasks submitted at once over HTTP [10000]")
    parser.add_argument("--memory-tasks", type=int, help="tasks before reading memory [100000]")
    parser.add_argument(
        "--cluster-memory-tasks",
        type=int,
        help="tasks through the api on the cluster before reading each master's memory [20000]",
    )
    parser.add_argument("--scale", default="1,2,4", help="worker process counts [1,2,4]")
    parser.add_argument(
        "--inference-tasks", type=int, help="tasks per inference run, over HTTP [3000]"
    )
    parser.add_argument(
        "--inference-concurrency", type=int, default=64, help="MAX_CONCURRENCY there [64]"
    )
    parser.add_argument(
        "--inference-ceiling-items",
        type=int,
        help="items the models are called with directly, per batch size [inference tasks, "
        "at least 2000]",
    )
    parser.add_argument(
        "--scaleout-cap",
        type=float,
        default=0.03,
        help="scaleout: cores each Redis node may use (cgroup CFS quota) [0.03]",
    )
    parser.add_argument(
        "--scaleout-period-us",
        type=int,
        default=33_333,
        help="scaleout: CFS period; at 0.03 cores the quota is the kernel's least, 1 ms [33333]",
    )
    parser.add_argument(
        "--scaleout-workers", type=int, default=3, help="scaleout: worker processes [3]"
    )
    parser.add_argument(
        "--scaleout-api-workers", type=int, default=3, help="scaleout: gunicorn workers [3]"
    )
    parser.add_argument(
        "--scaleout-connections", type=int, default=50, help="scaleout: wrk connections [50]"
    )
    parser.add_argument("--scaleout-tasks", type=int, help="scaleout: tasks per drain [5000]")
    parser.add_argument(
        "--scaleout-rounds",
        type=int,
        help="scaleout: rounds of drains and of POST runs per backend; median kept [3]",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}"
    )
    parser.add_argument(
        "--worker-log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="LOG_LEVEL of our drain workers [WARNING, as the peers log nothing by default];"
        " INFO, the worker's default, adds one JSON line per task",
    )
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    parser.add_argument("--keep-logs", action="store_true", help="keep process logs under --out")
    args = parser.parse_args(argv)
    quick = args.quick
    args.tasks = args.tasks or (5_000 if quick else 20_000)
    args.api_seconds = args.api_seconds or (2.0 if quick else 3.0)
    args.api_rounds = args.api_rounds or (2 if quick else 3)
    args.e2e_tasks = args.e2e_tasks or (2_000 if quick else 10_000)
    args.inference_tasks = args.inference_tasks or (1_000 if quick else 3_000)
    args.inference_ceiling_items = args.inference_ceiling_items or max(args.inference_tasks, 2000)
    args.memory_tasks = args.memory_tasks or (5_000 if quick else 100_000)
    # Not 100k as in the memory section: the cluster's six servers share the two cores with
    # the api and the worker; --cluster-memory-tasks 100000 runs the figure.
    args.cluster_memory_tasks = args.cluster_memory_tasks or (2_000 if quick else 20_000)
    args.scaleout_tasks = args.scaleout_tasks or (2_000 if quick else 5_000)
    args.scaleout_rounds = args.scaleout_rounds or (2 if quick else 3)
    args.scale = [int(n) for n in args.scale.split(",") if n]
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_start": os.getloadavg(),
    }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def worker_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    runs = []
    redis_server.flush()
    log(f"worker: fastapi-redis-mini, {args.tasks} tasks")
    runs.append(
        drain_ours(
            space,
            redis_server.url,
            tasks=args.tasks,
            concurrency=args.concurrency,
            log_level=args.worker_log_level,
        )
    )
    for peer in PEERS:
        redis_server.flush()
        log(f"worker: {peer}, {args.tasks} jobs")
        runs.append(
            drain_peer(
                space,
                args.peer_python,
                peer,
                redis_server.url,
                tasks=args.tasks,
                concurrency=args.concurrency,
            )
        )
    ours, peers = runs[0], runs[1:]
    best = max(peers, key=lambda r: r.drain_rate)
    best_wall = max(peers, key=lambda r: r.wall_rate)
    cheapest = min(peers, key=lambda r: r.cpu_per_task)
    return {
        "runs": [r.as_dict() for r in runs],
        "best_peer": best.system,
        # CPU per task (worker + Redis) hardly moves with machine load, unlike rates.
        "cpu_ratio": cheapest.cpu_per_task / ours.cpu_per_task if ours.cpu_per_task else 0.0,
        "cheapest_peer": cheapest.system,
        "ratio": ours.drain_rate / best.drain_rate if best.drain_rate else 0.0,
        "wall_ratio": ours.wall_rate / best_wall.wall_rate if best_wall.wall_rate else 0.0,
    }


def api_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    redis_server.flush()
    api = start_ours(space, redis_server.url, args.api_workers)
    bare = start_bare(space, args.api_workers)
    warmer = spawn_worker(space, redis_server.url, args.concurrency, "worker-warm")
    try:
        task_id = warm_cache(api)
    finally:
        warmer.stop()
    for server in (api, bare):
        # The first requests of a process import lazily and fill caches; keep them out.
        wrk(server.base_url, SCRIPTS["get"], seconds=1, connections=8, env={"TASK_ID": task_id})
    results = []
    for endpoint in LABELS:
        log(f"api: {LABELS[endpoint]}")
        results.append(
            measure_endpoint(endpoint, api, bare, task_id, args.api_seconds, args.api_rounds)
        )
    api.stop()
    bare.stop()
    return {"workers": args.api_workers, "endpoints": results}


@contextlib.contextmanager
def api_and_worker(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, label: str
) -> Iterator[tuple[Process, Process]]:
    """On an emptied server, the api and one ready worker, both stopped afterwards."""
    redis_server.flush()
    api = start_ours(space, redis_server.url, args.api_workers, name=f"api-{label}")
    worker = spawn_worker(space, redis_server.url, args.concurrency, f"worker-{label}")
    try:
        wait_worker_ready(worker)
        yield api, worker
    finally:
        worker.stop()
        api.stop()


def e2e_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    with api_and_worker(space, redis_server, args, "e2e") as (api, _):
        log(f"e2e: {args.e2e_tasks} tasks over HTTP")
        return end_to_end(api, redis_server.url, args.e2e_tasks)


def scale_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    runs = []
    for processes in args.scale:
        earlier = report.get("worker", {}).get("runs", [{}])[0]
        if processes == 1 and earlier.get("system") == "fastapi-redis-mini":
            runs.append(earlier)  # the worker section just measured this very case
            continue
        redis_server.flush()
        log(f"scale: {processes} worker process(es), {args.tasks} tasks")
        runs.append(
            drain_ours(
                space,
                redis_server.url,
                tasks=args.tasks,
                concurrency=args.concurrency,
                processes=processes,
                label=f"scale{processes}",
                log_level=args.worker_log_level,
            ).as_dict()
        )
    return {"runs": runs}


def memory_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    with api_and_worker(space, redis_server, args, "memory") as (api, worker):
        log(f"memory: {args.memory_tasks} tasks through the api with one worker")
        return memory_after(api, worker, redis_server, redis_server.url, args.memory_tasks)


def durable_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    """POST /tasks misses with DURABLE_ACKS=fsync against none, on Redis with its AOF."""
    results = {}
    for appendfsync in ("everysec", "always"):
        aof = space.redis(f"redis-aof-{appendfsync}", appendfsync=appendfsync)
        servers = {
            mode: start_ours(
                space, aof.url, args.api_workers, name=f"api-{mode}-{appendfsync}",
                env={"DURABLE_ACKS": mode},
            )
            for mode in ("none", "fsync")
        }  # fmt: skip
        log(f"durable: POST /tasks misses, DURABLE_ACKS fsync against none, {appendfsync}")
        try:
            results[appendfsync] = measure_durable_acks(servers, args.api_seconds, args.api_rounds)
        finally:
            for server in servers.values():
                server.stop()
            aof.stop()
    return results


def cluster_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    """A local Redis Cluster (3 masters, 3 replicas) against the single server, same run."""
    log(f"cluster: worker drain ({args.tasks} tasks) and api POST misses against the single "
        f"server, then memory per master after {args.cluster_memory_tasks} tasks")  # fmt: skip
    return cluster_versus_standalone(space, redis_server, args)


def inference_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    """A real model (embed) and the simulated accelerator: direct, batched, per task, peers."""
    tasks, concurrency = args.inference_tasks, args.inference_concurrency

    def api(name: str) -> Process:
        return start_ours(space, redis_server.url, args.api_workers, name=name)

    def run(handler: str, label: str) -> dict[str, Any]:
        log(f"inference: {label}, {tasks} tasks over HTTP, MAX_CONCURRENCY={concurrency}")
        return service_run(
            space, redis_server, api, handler=handler, label=label, tasks=tasks,
            concurrency=concurrency,
        )  # fmt: skip

    log("inference: the embed model called directly, by batch size")
    embed = {
        "ceiling": embed_ceiling(args.inference_ceiling_items),
        "batched": run("embed", "embed-batched"),
        "per_task": run(f"{BENCH_MODULE}:EmbedPerTask", "embed-per-task"),
    }
    log(f"inference: embed-drain, {tasks} tasks queued over HTTP first, then drained")
    embed["drain"] = drain_run(
        space, redis_server, api, handler="embed", label="embed-drain", tasks=tasks,
        concurrency=concurrency,
    )  # fmt: skip
    log("inference: the simulated accelerator called directly, by batch size")
    accelerator: dict[str, Any] = {
        "ceiling": accelerator_ceiling(min(tasks, 640)),
        "batched": run("simulate-batched", "accelerator-batched"),
        "per_task": run(f"{BENCH_MODULE}:AcceleratorPerTask", "accelerator-per-task"),
        "peers": [],
    }
    if args.peer_python.exists():
        for peer in PEERS:
            redis_server.flush()
            log(f"inference: {peer}, the accelerator per job, {tasks} jobs")
            result = drain_peer(
                space, args.peer_python, peer, redis_server.url, tasks=tasks,
                concurrency=concurrency, job="accelerator",
            )  # fmt: skip
            accelerator["peers"].append(result.as_dict())
    return {"tasks": tasks, "concurrency": concurrency, "embed": embed, "accelerator": accelerator}


def scaleout_section(
    space: Workspace, redis_server: RedisServer, args: argparse.Namespace, report: Report
) -> Any:
    """1 against 3 Redis Cluster masters, every node capped at --scaleout-cap cores."""
    log(
        f"scaleout: 1 and 3 masters at {args.scaleout_cap:g} cores per node; drain "
        f"({args.scaleout_tasks} tasks, {args.scaleout_workers} workers) and POST misses"
    )
    result = scale_out(space, args)
    if "skipped" in result:
        log(f"scaleout: skipped: {result['skipped']}")
    return result


RUNNERS: dict[str, Callable[[Workspace, RedisServer, argparse.Namespace, Report], Any]] = {
    "worker": worker_section,
    "api": api_section,
    "durable": durable_section,
    "e2e": e2e_section,
    "scale": scale_section,
    "memory": memory_section,
    "cluster": cluster_section,
    "inference": inference_section,
    "scaleout": scaleout_section,
}


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    require_wrk()
    if "worker" in args.sections and not args.peer_python.exists():
        sys.exit(f"bench: {args.peer_python} is missing; `make bench` creates the bench venv")
    began = time.perf_counter()
    report: Report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "settings": {
            "tasks": args.tasks,
            "concurrency": args.concurrency,
            "api_workers": args.api_workers,
            "api_seconds": args.api_seconds,
            "api_rounds": args.api_rounds,
            "e2e_tasks": args.e2e_tasks,
            "memory_tasks": args.memory_tasks,
            "cluster_memory_tasks": args.cluster_memory_tasks,
            "scale": args.scale,
            "scaleout_cap": args.scaleout_cap,
            "scaleout_period_us": args.scaleout_period_us,
            "scaleout_workers": args.scaleout_workers,
            "scaleout_api_workers": args.scaleout_api_workers,
            "scaleout_connections": args.scaleout_connections,
            "scaleout_tasks": args.scaleout_tasks,
            "scaleout_rounds": args.scaleout_rounds,
            "quick": args.quick,
            "worker_log_level": args.worker_log_level,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with workspace(args.out / "logs" if args.keep_logs else None) as space:
        redis_server = space.redis()
        report["machine"]["redis"] = redis_server.version()
        for section in args.sections:
            report[section] = RUNNERS[section](space, redis_server, args, report)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - began
    report["targets"] = targets(report)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "bench.md")
    print_table(report)
    log(f"done in {report['seconds']:.0f}s; wrote {args.out / 'bench.json'} and bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
