"""Turn one bench run into the target verdicts, a console table and a markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# One worker process at the service's defaults (LOG_LEVEL=INFO) against the better peer.
WORKER_GOAL = 12.0
API_GOALS = {"POST /tasks (miss)": 0.7, "POST /tasks (hit)": 0.8}
P99_GOAL = 2.0
# DURABLE_ACKS=fsync against none, POST /tasks misses at 50 connections, on appendfsync always.
DURABLE_GOAL = 0.5
MAX_CONNECTIONS_DURABLE = 50
# 3 capped Redis Cluster masters against 1, for worker drain and POST /tasks misses.
SCALEOUT_GOAL = 2.5
# Below this share of CFS periods at quota, the 3-master nodes were waiting for their clients:
# the run measured the clients' CPU, not Redis's.
SCALEOUT_BUSY = 0.8


# The service with batching against the model called alone at its best batch size, and
# against the better of arq and SAQ calling it once per job.
INFERENCE_CEILING_GOAL = 0.7
INFERENCE_PEER_GOAL = 2.0


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    worker = report.get("worker")
    if worker:
        verdicts.append(
            _verdict(
                f"worker drain rate / best peer ({worker['best_peer']})",
                worker["ratio"],
                WORKER_GOAL,
                at_least=True,
            )
        )
    api = report.get("api")
    if api:
        for endpoint in api["endpoints"]:
            goal = API_GOALS.get(endpoint["endpoint"])
            if goal is not None:
                verdicts.append(
                    _verdict(
                        f"{endpoint['endpoint']} rps / bare", endpoint["rps_ratio"], goal, True
                    )
                )
            verdicts.append(
                _verdict(
                    f"{endpoint['endpoint']} p99 at half max rate / bare",
                    endpoint["p99_ratio"],
                    P99_GOAL,
                    at_least=False,
                )
            )
    durable = report.get("durable")
    if durable and "always" in durable:
        verdicts.append(
            _verdict(
                "POST /tasks (miss) rps, DURABLE_ACKS fsync / none (appendfsync always)",
                durable["always"]["rps_ratio"],
                DURABLE_GOAL,
                at_least=True,
            )
        )
    inference = report.get("inference")
    if inference:
        for model in ("embed", "accelerator"):
            runs = inference[model]
            ceiling = runs["ceiling"]["best_rate"]
            verdicts.append(
                _verdict(
                    f"{model}: service tasks/s with batching / model alone (ceiling)",
                    runs["batched"]["rate"] / ceiling if ceiling else 0.0,
                    INFERENCE_CEILING_GOAL,
                    at_least=True,
                )
            )
            peers = runs.get("peers") or []
            if peers:
                best = max(peers, key=lambda r: r["drain_rate"])
                verdicts.append(
                    _verdict(
                        f"{model}: service tasks/s with batching / best peer ({best['system']})",
                        runs["batched"]["rate"] / best["drain_rate"] if best["drain_rate"] else 0,
                        INFERENCE_PEER_GOAL,
                        at_least=True,
                    )
                )
    scaleout = report.get("scaleout")
    if scaleout and "skipped" not in scaleout:
        for what, ratio in (
            ("worker drain", scaleout["drain"]["ratio"]),
            ("POST /tasks (miss) rps", scaleout["api"]["rps_ratio"]),
        ):
            verdicts.append(
                _verdict(f"{what}, 3 / 1 capped Redis masters", ratio, SCALEOUT_GOAL, True)
            )
    return verdicts


def _verdict(name: str, measured: float, goal: float, at_least: bool) -> dict[str, Any]:
    met = measured >= goal if at_least else measured <= goal
    return {
        "target": name,
        "measured": measured,
        "goal": f"{'>=' if at_least else '<='} {goal:g}",
        "met": met,
    }


def _cpu(run: dict[str, Any]) -> str:
    cpu = run.get("cpu") or {}
    user = cpu.get("worker_user_usec_per_task", 0.0)
    system = cpu.get("worker_system_usec_per_task", 0.0)
    return f"{user + system:.0f} ({user:.0f} user + {system:.0f} sys)"


def _waited(run: dict[str, Any]) -> str:
    sched = run.get("sched") or {}
    waiting = sched.get("worker_runqueue_wait_seconds", 0.0)
    wall = run.get("wall_seconds", 0.0) * max(run.get("processes", 1), 1)
    return f"{waiting:.2f}s ({100 * waiting / wall:.0f}% of wall)" if wall else "?"


def _rows(report: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    tables: list[tuple[str, list[list[str]]]] = []
    worker = report.get("worker")
    if worker:
        rows = [
            [
                "system",
                "tasks",
                "done",
                "drain tasks/s",
                "wall tasks/s",
                "enqueue s",
                "Redis cmds/task",
                "Redis CPU us/task",
                "worker CPU us/task",
                "worker waited for a CPU",
            ]
        ]
        for run in worker["runs"]:
            rows.append(
                [
                    run["system"],
                    str(run["tasks"]),
                    str(run["completed"]),
                    f"{run['drain_rate']:.0f}",
                    f"{run['wall_rate']:.0f}",
                    f"{run['enqueue_seconds']:.1f}",
                    f"{run['redis'].get('redis_commands_per_task', 0):.2f}",
                    f"{run['redis'].get('redis_cpu_usec_per_task', 0):.0f}",
                    _cpu(run),
                    _waited(run),
                ]
            )
        rows.append(
            [
                f"ratio vs {worker['best_peer']}",
                "",
                "",
                f"{worker['ratio']:.2f}x",
                f"{worker['wall_ratio']:.2f}x",
                "",
                "",
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"CPU per task, {worker['cheapest_peer']} / ours",
                "",
                "",
                f"{worker['cpu_ratio']:.2f}x",
                "",
                "",
                "",
                "",
                "",
                "",
            ]
        )
        tables.append(("Worker throughput, one process, concurrency 100", rows))
    api = report.get("api")
    if api:
        rows = [
            [
                "endpoint",
                "api rps",
                "bare rps",
                "ratio",
                "paced rps",
                "api p99 ms",
                "bare p99 ms",
                "p99 ratio",
                "CPU us/req api/bare",
                "CPU ratio",
                "errors",
            ]
        ]
        for e in api["endpoints"]:
            rows.append(
                [
                    e["endpoint"],
                    f"{e['api_max']['rps']:.0f}",
                    f"{e['bare_max']['rps']:.0f}",
                    _with_spread(e["rps_ratio"], e["rounds"]["rps_ratio"]),
                    f"{e['api_paced']['rps']:.0f}/{e['bare_paced']['rps']:.0f}",
                    f"{e['api_paced']['p99_us'] / 1000:.1f}",
                    f"{e['bare_paced']['p99_us'] / 1000:.1f}",
                    _with_spread(e["p99_ratio"], e["rounds"]["p99_ratio"]),
                    f"{e['api_max']['cpu_usec_per_request']:.0f}/"
                    f"{e['bare_max']['cpu_usec_per_request']:.0f}",
                    f"{e['cpu_ratio']:.2f}",
                    str(e["errors"]),
                ]
            )
        tables.append((f"Api throughput, gunicorn with {api['workers']} uvicorn workers", rows))
    e2e = report.get("e2e")
    if e2e:
        rows = [
            ["tasks", "done", "submit s", "all DONE s", "p50 to DONE", "p99 to DONE", "p99 wait"],
            [
                str(e2e["tasks"]),
                str(e2e["done"]),
                f"{e2e['submit_seconds']:.2f}",
                f"{e2e['all_done_seconds']:.2f}",
                f"{e2e['time_to_done_p50'] * 1000:.0f} ms",
                f"{e2e['time_to_done_p99'] * 1000:.0f} ms",
                f"{e2e['queue_wait_p99'] * 1000:.0f} ms",
            ],
        ]
        tables.append(("End to end over HTTP, one api, one worker", rows))
    durable = report.get("durable")
    if durable:
        rows = [["appendfsync", "DURABLE_ACKS", "rps", "p99", "fsync / none rps (rounds)"]]
        for appendfsync, result in durable.items():
            for mode in ("none", "fsync"):
                rows.append(
                    [
                        appendfsync,
                        mode,
                        f"{result['rps'][mode]:.0f}",
                        f"{result['p99_us'][mode] / 1000:.1f} ms",
                        ""
                        if mode == "none"
                        else f"{result['rps_ratio']:.2f} "
                        f"({', '.join(f'{r:.2f}' for r in result['rounds'])})",
                    ]
                )
        tables.append(
            (f"POST /tasks misses, {MAX_CONNECTIONS_DURABLE} connections, by DURABLE_ACKS", rows)
        )
    scale = report.get("scale")
    if scale:
        rows = [
            [
                "worker processes",
                "tasks",
                "done",
                "drain tasks/s",
                "wall tasks/s",
                "workers waited for a CPU",
            ]
        ]
        for run in scale["runs"]:
            rows.append(
                [
                    str(run["processes"]),
                    str(run["tasks"]),
                    str(run["completed"]),
                    f"{run['drain_rate']:.0f}",
                    f"{run['wall_rate']:.0f}",
                    _waited(run),
                ]
            )
        tables.append(("Worker scale-out on this machine", rows))
    memory = report.get("memory")
    if memory:
        rows = [["", "api RSS (all processes)", "worker RSS", "Redis used_memory"]]
        for when in ("before", "after"):
            m = memory[when]
            rows.append(
                [
                    when if when == "before" else f"after {memory['tasks']} tasks",
                    f"{m['api_rss_kib'] / 1024:.0f} MiB",
                    f"{m['worker_rss_kib'] / 1024:.0f} MiB",
                    f"{m['redis_used_memory'] / 2**20:.0f} MiB",
                ]
            )
        if "redis_bytes_per_task" in memory:
            rows.append(
                [
                    f"then {memory['hits']} cache hits",
                    "",
                    "",
                    f"{memory['after_hits']['redis_used_memory'] / 2**20:.0f} MiB",
                ]
            )
            rows.append(
                [
                    "Redis bytes",
                    "",
                    "",
                    f"{memory['redis_bytes_per_task']:.0f} per task, "
                    f"{memory['redis_bytes_per_hit']:.0f} per hit",
                ]
            )
        tables.append(("Memory", rows))
    cluster = report.get("cluster")
    if cluster:
        tables += _cluster_tables(cluster)
    scaleout = report.get("scaleout")
    if scaleout:
        tables.append(_scaleout_table(scaleout))
    if report.get("targets"):
        rows = [["target", "measured", "goal", "met"]]
        for t in report["targets"]:
            met = "yes" if t["met"] else "NO"
            rows.append([t["target"], f"{t['measured']:.2f}", t["goal"], met])
        tables.append(("Targets", rows))
    inference = report.get("inference")
    if inference:
        rows = [["model", "run", "tasks/s", "p50 to DONE", "p99 to DONE",
                 "CPU µs/task api/worker/Redis/bench", "note"]]  # fmt: skip
        for model in ("embed", "accelerator"):
            runs = inference[model]
            ceiling = runs["ceiling"]
            sizes = ", ".join(f"{b}: {r:.0f}/s" for b, r in ceiling["rates"].items())
            model_cpu = (
                f"model {ceiling['cpu_us_per_item']:.0f}" if "cpu_us_per_item" in ceiling else ""
            )
            rows.append([model, "(a) model alone", f"{ceiling['best_rate']:.0f}", "", "", model_cpu,
                         f"batch {ceiling['best_batch']} best of {sizes}"])  # fmt: skip
            for key, name in (("batched", "(b) service, batched"), ("per_task", "(c) per task")):
                run = runs[key]
                rows.append([model, name, f"{run['rate']:.0f}",
                             f"{run['time_to_done_p50'] * 1000:.0f} ms",
                             f"{run['time_to_done_p99'] * 1000:.0f} ms", _cpu_split(run),
                             f"{run['done']}/{run['tasks']} DONE over HTTP"])  # fmt: skip
            if "drain" in runs:
                drain = runs["drain"]
                rows.append([model, "(b2) worker, batched, queue filled first",
                             f"{drain['rate']:.0f}", "", "", "",
                             f"{drain['done']}/{drain['tasks']} DONE"])  # fmt: skip
            for peer in runs.get("peers") or []:
                done = f"{peer['completed']}/{peer['tasks']} jobs, enqueued first"
                rate = f"{peer['drain_rate']:.0f}"
                rows.append([model, f"(d) {peer['system']}", rate, "", "", "", done])
        tables.append((f"Inference, one worker, MAX_CONCURRENCY={inference['concurrency']}", rows))
    return tables


def _cpu_split(run: dict[str, Any]) -> str:
    cpu = run.get("cpu_us_per_task")
    if not cpu:
        return ""
    return "/".join(f"{cpu[part]:.0f}" for part in ("api", "worker", "redis", "bench"))


def _cluster_tables(cluster: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    shape = (
        f"{cluster['server']}, {cluster['masters']} masters, "
        f"{cluster['replicas_per_master']} replica each"
    )
    runs = cluster["worker"]["runs"]
    api = cluster["api"]
    rows = [["backend", "worker drain tasks/s", "POST /tasks (miss) rps", "POST p99"]]
    for name in ("standalone", "cluster"):
        rows.append(
            [
                name,
                f"{runs[name]['drain_rate']:.0f}",
                f"{api['rps'][name]:.0f}",
                f"{api['p99_us'][name] / 1000:.1f} ms",
            ]
        )
    rows.append(
        [
            "cluster / standalone",
            f"{cluster['worker']['rate_ratio']:.2f}",
            _with_spread(api["rps_ratio"], api["rounds"]),
            "",
        ]
    )
    memory = cluster["memory"]
    masters = [["master", "keys", "used_memory before", f"after {memory['tasks']} tasks"]]
    for address, after in memory["after"].items():
        before = memory["before"].get(address, {"used_memory": 0})
        masters.append(
            [
                address,
                str(after["keys"]),
                f"{before['used_memory'] / 2**20:.1f} MiB",
                f"{after['used_memory'] / 2**20:.1f} MiB",
            ]
        )
    masters.append(["Redis bytes per task", "", "", f"{memory['redis_bytes_per_task']:.0f}"])
    return [
        (f"Redis Cluster ({shape}, one machine) against a single server", rows),
        ("Redis Cluster: memory per master", masters),
    ]


def _scaleout_table(scaleout: dict[str, Any]) -> tuple[str, list[list[str]]]:
    if "skipped" in scaleout:
        return ("Scale-out over capped Redis masters", [["skipped"], [scaleout["skipped"]]])
    drain, api = scaleout["drain"], scaleout["api"]
    rows = [
        [
            "backend",
            "drain tasks/s",
            "Redis cmds/task",
            "Redis CPU us/task",
            "Redis throttled, spawn to idle",
            "workers waited for a CPU",
            "POST /tasks (miss) rps",
            "POST p99",
            "Redis throttled, POST rounds",
        ]
    ]
    for name, run in drain["runs"].items():
        rows.append(
            [
                name,
                f"{run['drain_rate']:.0f}",
                f"{run['redis'].get('redis_commands_per_task', 0):.1f}",
                f"{run['redis'].get('redis_cpu_usec_per_task', 0):.0f}",
                f"{100 * run['redis_throttled_share']:.0f}% of periods",
                _waited(run),
                f"{api['rps'][name]:.0f}",
                f"{api['p99_us'][name] / 1000:.0f} ms",
                f"{100 * api['redis_throttled_share'][name]:.0f}% of periods",
            ]
        )
    rows.append(
        [
            "3 masters / 1 master",
            _with_spread(drain["ratio"], drain["rounds"]),
            "",
            "",
            "",
            "",
            _with_spread(api["rps_ratio"], api["rounds"]),
            "",
            "",
        ]
    )
    # Only the POST share is clean: the drain's runs from the workers' spawn, start-up included.
    busy = api["redis_throttled_share"].get("3 masters", 0.0)
    if busy < SCALEOUT_BUSY:
        note = (
            f"POST: 3 masters at quota in {100 * busy:.0f}% of periods only;"
            " the clients, not Redis, set that ratio"
        )
        rows.append([note] + [""] * (len(rows[0]) - 1))
    title = (
        f"Scale-out: Redis Cluster ({scaleout['server']}, no replicas), each node capped at "
        f"{scaleout['cap_cores']:g} cores; {scaleout['worker_processes']} worker processes, "
        f"api with {scaleout['api_workers']} workers"
    )
    return (title, rows)


def print_table(report: dict[str, Any]) -> None:
    for title, rows in _rows(report):
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print(f"\n{title}")
        for n, row in enumerate(rows):
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
            if n == 0:
                print("  ".join("-" * width for width in widths))


def _with_spread(median: float, rounds: list[float]) -> str:
    """The median round's ratio, and the range over all rounds."""
    if len(rounds) < 2:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    m = report["machine"]
    lines = [
        "# Benchmark run",
        "",
        f"Started {report['started']}, took {report['seconds']:.0f} s.",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"{m.get('redis', 'redis ?')}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in m.get('load_average_end', ()))}.",
        "",
        f"Settings: `{report['settings']}`",
    ]
    for title, rows in _rows(report):
        lines += ["", f"## {title}", ""]
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "|".join("---" for _ in rows[0]) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    path.write_text("\n".join(lines) + "\n")
