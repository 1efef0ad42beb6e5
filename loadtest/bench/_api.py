"""Api throughput: the real api against a bare FastAPI app, same gunicorn setup, same wrk.

For each of POST /tasks (miss), POST /tasks (hit) and GET /tasks/{id}:
1. maximum rate: wrk with many connections, as fast as the server answers;
2. latency at half of the real api's maximum rate: both servers get the same paced load
   (each connection pauses between requests), and their p99 is compared.
"""

from __future__ import annotations

import json
import sys
import urllib.request
import uuid
from typing import Any

from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.processes import SERVICE_DEFAULTS, Process, Workspace, start_api

from ._measure import ROOT, tree_cpu_seconds, wrk
from ._workers import QUOTAS_OFF_ENV

SCRIPTS = {"post_miss": "post_miss.lua", "post_hit": "post_hit.lua", "get": "get_task.lua"}
LABELS = {
    "post_miss": "POST /tasks (miss)",
    "post_hit": "POST /tasks (hit)",
    "get": "GET /tasks/{id}",
}
MAX_CONNECTIONS = 50
PACED_CONNECTIONS = 16
HIT_BODY = b'{"prompt": "bench hit", "params": {"duration": 0}}'


def api_env(workers: int, space: Workspace, name: str) -> dict[str, str]:
    """The api's variables in every bench run; the service's defaults for everything else."""
    return {
        "WEB_CONCURRENCY": str(workers),
        "LOG_LEVEL": "WARNING",
        # The bench queues far more than the default backlog allows, with no worker running;
        # the gate still reads the lag once a second as it does in production.
        "MAX_BACKLOG": "1000000000",
        # One client without a key stands for every tenant at once: the per-key quotas (20
        # submits a second by default) would measure the quota, not the api, and with any of
        # them on a cluster's queue is one partition. `make api-ab` measures what they cost.
        **QUOTAS_OFF_ENV,
        "PROMETHEUS_MULTIPROC_DIR": str(space.root / f"metrics-{name}"),
    }


def start_ours(
    space: Workspace,
    url: str,
    workers: int,
    name: str = "api",
    env: dict[str, str] | None = None,
) -> Process:
    """The real api under gunicorn with `workers` workers, ready, stopped with the workspace."""
    return space.own(
        start_api(
            url,
            {**api_env(workers, space, name), **(env or {})},
            defaults=SERVICE_DEFAULTS,
            name=name,
            log_path=space.log_path(name),
        )
    )


def start_bare(space: Workspace, workers: int) -> Process:
    port = free_port()
    process = space.spawn(
        "bare",
        [
            sys.executable, "-m", "gunicorn", "loadtest.bench.bare_app:app",
            "--worker-class", "uvicorn_worker.UvicornWorker", "--workers", str(workers),
            "--bind", f"127.0.0.1:{port}", "--keep-alive", "5", "--log-level", "warning",
        ],
        cwd=ROOT,
        port=port,
    )  # fmt: skip
    process.wait_until_answers("/healthz")
    return process


def _post(base: str, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 (loopback only)
        f"{base}/tasks", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def _get(base: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}{path}", timeout=40) as response:  # noqa: S310
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def warm_cache(api: Process) -> str:
    """Run the hit prompt once (a worker must be running); returns its finished task's id."""
    submitted = _post(api.base_url, HIT_BODY)
    task_id = str(submitted["task_id"])

    def done() -> bool:
        return bool(_get(api.base_url, f"/tasks/{task_id}?wait=10")["status"] == "DONE")

    poll(done, 60, 0, "the warm-up task did not finish")
    again = _post(api.base_url, HIT_BODY)
    if not again.get("cached"):
        raise RuntimeError(f"the warmed prompt is not served from the cache: {again}")
    return task_id


def rps(result: dict[str, Any]) -> float:
    seconds = result["duration_us"] / 1e6
    return result["requests"] / seconds if seconds > 0 else 0.0


def errors(result: dict[str, Any]) -> int:
    keys = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    return sum(int(result[key]) for key in keys)


def _max_rate(
    server: Process,
    script: str,
    seconds: float,
    env: dict[str, str],
    connections: int = MAX_CONNECTIONS,
) -> dict[str, Any]:
    cpu_before = tree_cpu_seconds(server.pid)
    result = wrk(server.base_url, script, seconds=seconds, connections=connections, env=env)
    cpu = tree_cpu_seconds(server.pid) - cpu_before
    return {
        **result,
        "rps": rps(result),
        "errors": errors(result),
        "cpu_usec_per_request": cpu * 1e6 / max(result["requests"], 1),
    }


def _paced(
    server: Process, script: str, seconds: float, env: dict[str, str], delay_ms: int
) -> dict[str, Any]:
    result = wrk(
        server.base_url,
        script,
        seconds=seconds,
        connections=PACED_CONNECTIONS,
        env={**env, "WRK_DELAY_MS": str(delay_ms)},
    )
    return {**result, "rps": rps(result), "errors": errors(result)}


def _median_round(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round whose `key` ratio is the median (the lower middle one for an even count)."""
    ordered = sorted(rounds, key=lambda r: float(r[key]))
    return ordered[(len(ordered) - 1) // 2]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def measure_endpoint(
    endpoint: str, ours: Process, bare: Process, task_id: str, seconds: float, rounds: int = 3
) -> dict[str, Any]:
    """Alternate the two servers over `rounds` rounds and report the median round.

    Other tenants of a shared machine slow it down in bursts of seconds; a ratio taken from
    one pair of runs can land one run inside such a burst and the other outside. Each round
    runs both servers back to back, in alternating order, and the round with the median
    ratio is the one reported; every round's ratios are kept beside it.
    """
    script = SCRIPTS[endpoint]
    env = {"TASK_ID": task_id, "BENCH_RUN_ID": uuid.uuid4().hex[:8]}
    max_rounds: list[dict[str, Any]] = []
    for n in range(rounds):
        order = (ours, bare) if n % 2 == 0 else (bare, ours)
        runs = {server.name: _max_rate(server, script, seconds, env) for server in order}
        mine, theirs = runs[ours.name], runs[bare.name]
        max_rounds.append(
            {
                "ours": mine,
                "bare": theirs,
                "rps_ratio": _ratio(mine["rps"], theirs["rps"]),
                # Server CPU per request hardly depends on what else the machine runs; rates do.
                "cpu_ratio": _ratio(theirs["cpu_usec_per_request"], mine["cpu_usec_per_request"]),
            }
        )
    best = _median_round(max_rounds, "rps_ratio")
    half_rate = best["ours"]["rps"] / 2
    delay_ms = max(1, round(1000 * PACED_CONNECTIONS / half_rate)) if half_rate > 0 else 1000
    paced_rounds: list[dict[str, Any]] = []
    for n in range(rounds):
        order = (ours, bare) if n % 2 == 0 else (bare, ours)
        runs = {server.name: _paced(server, script, seconds, env, delay_ms) for server in order}
        mine, theirs = runs[ours.name], runs[bare.name]
        paced_rounds.append(
            {"ours": mine, "bare": theirs, "p99_ratio": _ratio(mine["p99_us"], theirs["p99_us"])}
        )
    paced = _median_round(paced_rounds, "p99_ratio")
    return {
        "endpoint": LABELS[endpoint],
        f"{ours.name}_max": best["ours"],
        "bare_max": best["bare"],
        "rps_ratio": best["rps_ratio"],
        "cpu_ratio": best["cpu_ratio"],
        "paced_target_rps": half_rate,
        f"{ours.name}_paced": paced["ours"],
        "bare_paced": paced["bare"],
        "p99_ratio": paced["p99_ratio"],
        "rounds": {
            "rps_ratio": [r["rps_ratio"] for r in max_rounds],
            "cpu_ratio": [r["cpu_ratio"] for r in max_rounds],
            "p99_ratio": [r["p99_ratio"] for r in paced_rounds],
        },
        "errors": sum(
            r[side]["errors"] for r in (*max_rounds, *paced_rounds) for side in ("ours", "bare")
        ),
    }


def measure_post_misses(
    servers: dict[str, Process],
    seconds: float,
    rounds: int,
    ratio_of: tuple[str, str],
    connections: int = MAX_CONNECTIONS,
) -> dict[str, Any]:
    """POST /tasks misses at `connections` on apis that differ in one setting.

    The apis take turns within each round, in alternating order, so a burst of other load
    falls on all; the round with the median rps ratio of ratio_of[0] to ratio_of[1] is
    reported.
    """
    env = {"BENCH_RUN_ID": uuid.uuid4().hex[:8]}
    names = list(servers)
    numerator, denominator = ratio_of
    kept: list[dict[str, Any]] = []
    for n in range(rounds):
        order = names if n % 2 == 0 else names[::-1]
        runs = {
            name: _max_rate(servers[name], SCRIPTS["post_miss"], seconds, env, connections)
            for name in order
        }
        ratio = _ratio(runs[numerator]["rps"], runs[denominator]["rps"])
        kept.append({"runs": runs, "rps_ratio": ratio})
    median = _median_round(kept, "rps_ratio")
    return {
        "connections": connections,
        "rps": {name: run["rps"] for name, run in median["runs"].items()},
        "p99_us": {name: run["p99_us"] for name, run in median["runs"].items()},
        "errors": sum(run["errors"] for r in kept for run in r["runs"].values()),
        "rps_ratio": median["rps_ratio"],
        "rounds": [r["rps_ratio"] for r in kept],
    }


def measure_durable_acks(
    servers: dict[str, Process], seconds: float, rounds: int
) -> dict[str, Any]:
    """POST /tasks misses on apis that differ only in DURABLE_ACKS: fsync against none."""
    return measure_post_misses(servers, seconds, rounds, ratio_of=("fsync", "none"))
