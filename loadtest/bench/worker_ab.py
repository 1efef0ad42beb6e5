"""Two workers side by side: alternating drains on one Redis, with arq's drain in every round.

    python -m loadtest.bench.worker_ab --base HEAD~1           # HEAD~1's worker against this tree's
    python -m loadtest.bench.worker_ab --env READ_BATCH=50     # a setting against the defaults
    python -m loadtest.bench.worker_ab --base 683e5cb --rounds 6 --tasks 20000

On a shared machine the speed of a drain moves by a quarter from one minute to the next, so
one run of each version says little. Here A (the --base revision, or this tree) and B (this
tree, with --env) drain the same no-op tasks in turns, A then B then arq, B then A then arq,
and so on, each worker started fresh on the same Valkey. A slowdown that shows in every
round is the code's; the medians and each round's B/A ratio are printed at the end.

--base checks the revision out into a temporary git worktree; its worker runs with that
tree's services/ first on PYTHONPATH. The tasks are queued by this tree's submit path, so the
two versions must read the same stored task (any two nearby commits do).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from fastapi_redis_mini_harness.processes import workspace

from ._measure import ROOT
from ._workers import DrainResult, drain_ours, drain_peer

PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:5]) if __doc__ else None,
    )
    parser.add_argument("--base", help="git revision for A [A is this tree too]")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a setting for B only"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds of A, B and arq [4]")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per drain [20000]")
    parser.add_argument("--concurrency", type=int, default=100, help="MAX_CONCURRENCY [100]")
    parser.add_argument(
        "--log-level", default="INFO", help="LOG_LEVEL of both workers [INFO, the default]"
    )
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--no-peer", action="store_true", help="leave arq out")
    args = parser.parse_args(argv)
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env takes NAME=VALUE, not {item!r}")
    if args.rounds < 1 or args.tasks < 1:
        parser.error("--rounds and --tasks must be at least 1")
    if not args.no_peer and not args.peer_python.exists():
        parser.error(
            f"--peer-python {args.peer_python} does not exist: make .venv-bench/.installed"
        )
    return args


@contextlib.contextmanager
def checkout(revision: str | None) -> Iterator[Path]:
    """This tree for None, else `revision` in a temporary worktree, removed afterwards."""
    if revision is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="worker-ab-") as parent:
        tree = Path(parent) / "tree"
        git = ["git", "-C", str(ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", "--quiet", str(tree), revision],
                       check=True)  # fmt: skip
        try:
            yield tree
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


@contextlib.contextmanager
def environment(tree: Path, extra: dict[str, str]) -> Iterator[None]:
    """The worker about to start imports the package from `tree`, with `extra` set."""
    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(tree / "services"), *filter(None, [saved.get("PYTHONPATH")])]
    )
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def describe(result: DrainResult) -> str:
    cpu = result.cpu.get("worker_user_usec_per_task", 0.0) + result.cpu.get(
        "worker_system_usec_per_task", 0.0
    )
    redis = result.redis.get("redis_cpu_usec_per_task", 0.0)
    return (
        f"{result.drain_rate:8.0f} tasks/s  worker {cpu:5.1f} us/task  Redis {redis:5.1f} us/task"
        f"  {result.completed}/{result.tasks} done"
    )


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    rates: dict[str, list[float]] = {"A": [], "B": [], "arq": []}
    ratios: list[float] = []
    with checkout(args.base) as base_tree, workspace(None) as space:
        redis_server = space.redis()
        trees = {"A": (base_tree, {}), "B": (ROOT, extra)}
        print(f"A: {args.base or 'this tree'}; B: this tree {' '.join(args.env)}", flush=True)
        for round_ in range(args.rounds):
            order = ("A", "B") if round_ % 2 == 0 else ("B", "A")
            this_round: dict[str, float] = {}
            for name in order:
                tree, env = trees[name]
                redis_server.flush()
                with environment(tree, env):
                    result = drain_ours(
                        space, redis_server.url, tasks=args.tasks, concurrency=args.concurrency,
                        label=f"ab-{name}-{round_}", log_level=args.log_level,
                    )  # fmt: skip
                if result.completed != args.tasks:
                    print(f"{name} finished {result.completed} of {args.tasks}", file=sys.stderr)
                    return 1
                this_round[name] = result.drain_rate
                rates[name].append(result.drain_rate)
                print(f"round {round_ + 1} {name:3}  {describe(result)}", flush=True)
            if not args.no_peer:
                redis_server.flush()
                peer = drain_peer(
                    space, args.peer_python, "arq", redis_server.url,
                    tasks=args.tasks, concurrency=args.concurrency,
                )  # fmt: skip
                rates["arq"].append(peer.drain_rate)
                print(f"round {round_ + 1} arq  {describe(peer)}", flush=True)
            ratios.append(this_round["B"] / this_round["A"])
    print()
    for name, values in rates.items():
        if values:
            line = f"{name:3}  median {statistics.median(values):8.0f} tasks/s"
            if name != "arq" and rates["arq"]:
                line += (
                    f"  ({statistics.median(values) / statistics.median(rates['arq']):.2f}x arq)"
                )
            print(line)
    print("B/A by round: " + ", ".join(f"{r:.3f}" for r in ratios)
          + f"; median {statistics.median(ratios):.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
