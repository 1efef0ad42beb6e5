"""Worker throughput: N no-op tasks queued first, then timed from worker start until all DONE.

Two figures per run:
- drain rate: tasks / (last finish - first start), from the timestamps each system stores
  with its jobs; start-up and exit detection are left out, so this is the steady rate.
- wall rate: tasks / (process spawn -> all done seen), start-up included.
The ratios use the drain rate; both are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import QueueStats, SubmitOutcome
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini_harness.polling import poll_async
from fastapi_redis_mini_harness.processes import (
    SERVICE_DEFAULTS,
    Process,
    Workspace,
    start_worker,
    stop_together,
)

from ._measure import BENCH_DIR, ROOT, schedstat

# redis-py 8 caps a client pool at 100 connections; stay well below it.
CHUNK = 50
POLL_INTERVAL = 0.02
PEERS = ("arq", "saq")
READ_CHUNK = 2000
TIME_FIELDS = ("status", "created_at", "started_at", "finished_at")


@dataclass(frozen=True)
class RedisCounters:
    """What the Redis server itself counts: commands, time inside commands, CPU."""

    calls: int
    command_usec: int
    cpu_seconds: float

    @classmethod
    def read(cls, url: str) -> RedisCounters:
        """The server's counters; on a Redis Cluster, the sum over its masters."""
        calls = command_usec = 0
        cpu_seconds = 0.0
        for server in _masters(url):
            with server as client:
                commands: dict[str, Any] = client.info("commandstats")
                cpu: dict[str, Any] = client.info("cpu")
            calls += sum(int(c["calls"]) for c in commands.values())
            command_usec += sum(int(c["usec"]) for c in commands.values())
            cpu_seconds += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        return cls(calls=calls, command_usec=command_usec, cpu_seconds=cpu_seconds)

    def per_task(self, later: RedisCounters, tasks: int) -> dict[str, float]:
        n = max(tasks, 1)
        return {
            "redis_commands_per_task": (later.calls - self.calls) / n,
            "redis_command_usec_per_task": (later.command_usec - self.command_usec) / n,
            "redis_cpu_usec_per_task": (later.cpu_seconds - self.cpu_seconds) * 1e6 / n,
        }


def _masters(url: str) -> list[redis.Redis]:
    """A client for the server at `url`, or for every master of the cluster it belongs to."""
    client = redis.Redis.from_url(url)
    if not int(client.info("cluster").get("cluster_enabled", 0)):
        return [client]
    with client:
        nodes: dict[str, dict[str, Any]] = client.cluster("NODES")
    addresses = [name.split("@")[0] for name, node in nodes.items() if "master" in node["flags"]]
    return [redis.Redis(host=a.rsplit(":", 1)[0], port=int(a.rsplit(":", 1)[1])) for a in addresses]


@dataclass(frozen=True)
class ChildCpu:
    """CPU seconds used by reaped child processes, so a worker's CPU can be read by difference."""

    user: float
    system: float

    @classmethod
    def read(cls) -> ChildCpu:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(usage.ru_utime, usage.ru_stime)

    def per_task(self, later: ChildCpu, tasks: int) -> dict[str, float]:
        n = max(tasks, 1)
        return {
            "worker_user_usec_per_task": (later.user - self.user) * 1e6 / n,
            "worker_system_usec_per_task": (later.system - self.system) * 1e6 / n,
        }


@dataclass
class DrainResult:
    system: str
    processes: int
    concurrency: int
    tasks: int
    completed: int
    drain_seconds: float
    wall_seconds: float
    enqueue_seconds: float
    redis: dict[str, float] = field(default_factory=dict)
    # Worker processes' CPU from spawn to exit, start-up included.
    cpu: dict[str, float] = field(default_factory=dict)
    # On-CPU and runnable-but-waiting seconds of the worker processes' main threads.
    sched: dict[str, float] = field(default_factory=dict)

    @property
    def drain_rate(self) -> float:
        return self.completed / self.drain_seconds if self.drain_seconds > 0 else 0.0

    @property
    def wall_rate(self) -> float:
        return self.completed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def cpu_per_task(self) -> float:
        """Microseconds of worker plus Redis CPU per task, worker start-up included."""
        return (
            self.cpu.get("worker_user_usec_per_task", 0.0)
            + self.cpu.get("worker_system_usec_per_task", 0.0)
            + self.redis.get("redis_cpu_usec_per_task", 0.0)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "drain_rate": self.drain_rate,
            "wall_rate": self.wall_rate,
            "cpu_per_task": self.cpu_per_task,
        }


# One submitter stands for every tenant: the per-key quotas (on by default) would queue the
# first hundred tasks and refuse the rest, as the api section's settings say. The bench's own
# queue (which queues the tasks and watches them drain) and the workers it starts take them
# off alike: with any quota on, a cluster's queue is one partition, with none 16, so workers
# with the defaults would read a stream nothing was queued in.
QUOTAS_OFF: dict[str, Any] = {
    "submit_rate_per_key": 0,
    "max_unfinished_per_key": 0,
    "max_stored_bytes_per_key": 0,
}
QUOTAS_OFF_ENV = {name.upper(): str(value) for name, value in QUOTAS_OFF.items()}
# How long the workers may take to start reading the queue: a worker joins the consumer group
# of every partition it reads with its first read, which follows its start-up by seconds.
JOIN_TIMEOUT = 60.0


def _queue(url: str) -> RedisTaskQueue:
    settings = Settings(redis_url=url, **QUOTAS_OFF)
    return RedisTaskQueue(connect(settings), settings)


async def enqueue_ours(
    url: str, tasks: int, label: str, params: dict[str, Any] | None = None
) -> list[str]:
    """Queue tasks with distinct prompts through the service's own submit path (the Lua submit
    script): no-op ones (`duration` 0), or with `params` for another handler."""
    task_params = {"duration": 0} if params is None else params
    queue = _queue(url)
    ids: list[str] = []
    try:
        for start in range(0, tasks, CHUNK):
            requests = [
                TaskCreate(prompt=f"bench {label} {i}", params=task_params)
                for i in range(start, min(start + CHUNK, tasks))
            ]
            submitted = await asyncio.gather(
                *(queue.submit(r, signature=request_signature(r)) for r in requests)
            )
            refused = {s.outcome for s in submitted} - {SubmitOutcome.QUEUED}
            if refused:
                raise RuntimeError(f"bench tasks not queued: {', '.join(sorted(refused))}")
            ids.extend(s.task_id for s in submitted)
    finally:
        await queue.close()
    return ids


async def wait_idle(url: str, deadline: float, *, join_timeout: float = JOIN_TIMEOUT) -> float:
    """When the consumer group was first seen with nothing undelivered or unacknowledged
    (time.perf_counter()), polled until `deadline` on that clock.

    Raises RuntimeError once `join_timeout` seconds pass with tasks waiting and no consumer
    in any of the queue's groups: the workers read other keys than the bench queued in (their
    settings give other partitions), so waiting longer cannot help.
    """
    queue = _queue(url)
    joined_by = time.perf_counter() + join_timeout
    last: list[QueueStats] = []

    async def idle() -> float | None:
        stats = await queue.stats()
        last[:] = [stats]
        # The backlog, not the lag: with PRIORITY_LANES tasks wait in the lanes, not the stream.
        if stats.backlog == 0 and stats.pending == 0:
            return time.perf_counter()
        if stats.consumers == 0 and time.perf_counter() > joined_by:
            raise RuntimeError(
                f"no worker reads the queue: {stats.backlog} tasks wait and, {join_timeout:g} s "
                f"after the workers were started, the consumer groups of the queue's "
                f"{len(queue.partitions)} partition(s) have no consumer; the workers' settings "
                "(QUEUE_PARTITIONS, the per-key quotas, PRIORITY_LANES) must give the same "
                "partitions as the bench's"
            )
        return None

    def undrained() -> str:
        if not last:
            return "the workers did not drain the queue"
        stats = last[0]
        return (
            f"the workers did not drain the queue: {stats.backlog} tasks waiting, "
            f"{stats.pending} delivered but not acknowledged, {stats.retry_size} waiting to be "
            f"retried, {stats.consumers} consumer(s) in the groups of "
            f"{len(queue.partitions)} partition(s)"
        )

    try:
        return await poll_async(
            idle, max(0.0, deadline - time.perf_counter()), POLL_INTERVAL, undrained
        )
    finally:
        await queue.close()


async def task_times(url: str, ids: Sequence[str]) -> list[tuple[float, float, float]]:
    """(created_at, started_at, finished_at) of every DONE task.

    Read with pipelined HMGETs on the service's own key names: the queue's get() does one
    round trip per task, which on a busy two-core machine took longer than the run itself.
    """
    queue = _queue(url)  # its key names, which differ on a Redis Cluster
    times: list[tuple[float, float, float]] = []
    try:
        for start in range(0, len(ids), READ_CHUNK):
            async with queue.redis.pipeline(transaction=False) as pipe:
                for task_id in ids[start : start + READ_CHUNK]:
                    partition = queue.partitions.of_task(task_id)
                    assert partition is not None, task_id
                    pipe.hmget(partition.task(task_id), TIME_FIELDS)
                rows = await pipe.execute()
            for status, created, started, finished in rows:
                if status == TaskStatus.DONE and created and started and finished:
                    times.append((float(created), float(started), float(finished)))
    finally:
        await queue.close()
    return times


def worker_env(
    concurrency: int, log_level: str = "WARNING", handler: str | None = None
) -> dict[str, str]:
    # The quotas off, as in the bench's own queue (see QUOTAS_OFF), so that both name the
    # same partitions whatever the calling shell sets. Defaults everywhere else, so every
    # reliability guarantee is on; only logs are quieter, as the peers log nothing at their
    # library defaults either. INFO (the worker's default) adds one JSON line per finished
    # task; --worker-log-level INFO shows what that costs.
    env = {"MAX_CONCURRENCY": str(concurrency), "LOG_LEVEL": log_level, **QUOTAS_OFF_ENV}
    return env if handler is None else {**env, "TASK_HANDLER": handler}


def spawn_worker(
    space: Workspace,
    url: str,
    concurrency: int,
    name: str,
    log_level: str = "WARNING",
    handler: str | None = None,
) -> Process:
    """A worker started now, not waited for (its start-up is part of a drain's wall time)."""
    return space.own(
        start_worker(
            url,
            worker_env(concurrency, log_level, handler),
            wait=False,
            defaults=SERVICE_DEFAULTS,
            name=name,
            log_path=space.log_path(name),
        )
    )


def wait_worker_ready(worker: Process) -> None:
    """Wait for the worker's own /readyz, served on its METRICS_PORT."""
    worker.wait_until_answers("/readyz")


def drain_ours(
    space: Workspace,
    url: str,
    *,
    tasks: int,
    concurrency: int,
    processes: int = 1,
    timeout: float = 300.0,
    label: str = "drain",
    log_level: str = "WARNING",
    during: contextlib.AbstractContextManager[object] | None = None,
) -> DrainResult:
    """Queue `tasks`, then drain them with `processes` workers, inside `during` if given
    (entered once the tasks are queued, left before they are read back: a CPU cap on Redis)."""
    started = time.perf_counter()
    ids = asyncio.run(enqueue_ours(url, tasks, label))
    enqueue_seconds = time.perf_counter() - started
    with during or contextlib.nullcontext():
        before = RedisCounters.read(url)
        cpu_before = ChildCpu.read()
        spawned = time.perf_counter()
        workers = [
            spawn_worker(space, url, concurrency, f"worker-{label}-{n}", log_level)
            for n in range(processes)
        ]
        try:
            idle_at = asyncio.run(wait_idle(url, spawned + timeout))
            sched = [schedstat(worker.pid) for worker in workers]
        finally:
            stop_together(workers)
        cpu_after = ChildCpu.read()
        after = RedisCounters.read(url)
    times = asyncio.run(task_times(url, ids))
    first_start = min((t[1] for t in times), default=0.0)
    last_finish = max((t[2] for t in times), default=0.0)
    return DrainResult(
        system="fastapi-redis-mini",
        processes=processes,
        concurrency=concurrency,
        tasks=tasks,
        completed=len(times),
        drain_seconds=last_finish - first_start,
        wall_seconds=idle_at - spawned,
        enqueue_seconds=enqueue_seconds,
        redis=before.per_task(after, tasks),
        cpu=cpu_before.per_task(cpu_after, tasks),
        sched=_sched_summary(sched),
    )


def _sched_summary(samples: Sequence[tuple[float, float]]) -> dict[str, float]:
    return {
        "worker_on_cpu_seconds": sum(on_cpu for on_cpu, _ in samples),
        "worker_runqueue_wait_seconds": sum(waiting for _, waiting in samples),
    }


def _peer(python: Path, action: str, system: str, url: str, tasks: int, *extra: str) -> Any:
    argv = [
        str(python), str(BENCH_DIR / "peers.py"), action, system,
        "--redis-url", url, "--jobs", str(tasks), *extra,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"peers.py {action} {system} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def drain_peer(
    space: Workspace,
    python: Path,
    system: str,
    url: str,
    *,
    tasks: int,
    concurrency: int,
    timeout: float = 300.0,
    job: str = "noop",
) -> DrainResult:
    enqueued = _peer(python, "enqueue", system, url, tasks, "--job", job)
    before = RedisCounters.read(url)
    cpu_before = ChildCpu.read()
    worker = space.spawn(
        f"worker-{system}",
        [
            str(python), str(BENCH_DIR / "peers.py"), "work", system,
            "--redis-url", url, "--jobs", str(tasks), "--concurrency", str(concurrency),
            "--job", job,
        ],
    )  # fmt: skip
    # The peer exits by itself when done; its scheduler counters are read until then.
    sched = (0.0, 0.0)
    deadline = time.perf_counter() + timeout
    while worker.alive():
        if time.perf_counter() > deadline:
            worker.stop()
            raise TimeoutError(f"{system} did not finish in {timeout:g}s")
        sched = schedstat(worker.pid) if worker.alive() else sched
        time.sleep(0.02)
    wall = time.perf_counter() - worker.started
    cpu_after = ChildCpu.read()
    after = RedisCounters.read(url)
    if worker.process.returncode != 0:
        raise RuntimeError(f"{system} worker failed:\n{worker.log_tail()}")
    stats = _peer(python, "stats", system, url, tasks)
    drain = (stats["last_finish"] or 0.0) - (stats["first_start"] or 0.0)
    return DrainResult(
        system=system,
        processes=1,
        concurrency=concurrency,
        tasks=tasks,
        completed=int(stats["completed"]),
        drain_seconds=drain,
        wall_seconds=wall,
        enqueue_seconds=float(enqueued["seconds"]),
        redis=before.per_task(after, tasks),
        cpu=cpu_before.per_task(cpu_after, tasks),
        sched=_sched_summary([sched]),
    )
