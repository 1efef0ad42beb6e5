"""What the benchmark reads off the machine (/proc: CPU, memory, scheduler waits) and wrk's load.

Servers and processes come from the harness; this module only measures them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
WRK_DIR = BENCH_DIR / "wrk"


def rss_kib(pid: int) -> int:
    """Resident set size of one process in KiB, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process's main thread.

    The second figure is how much a busy machine held a process back: on two shared cores
    it explains most of the run-to-run spread.
    """
    try:
        on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return (0.0, 0.0)
    return (int(on_cpu) / 1e9, int(waiting) / 1e9)


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task_dir in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in (task_dir / "children").read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of one process so far, 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its direct children (gunicorn's master and its workers)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children_of(pid))


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and its direct children (gunicorn's master and its workers)."""
    return rss_kib(pid) + sum(rss_kib(child) for child in children_of(pid))


def wrk(
    url: str,
    script: str,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run Debian's wrk with one of our Lua scripts; they print one JSON line in done()."""
    argv = [
        "wrk", "--latency", "-t", str(threads), "-c", str(connections),
        "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
        "-s", str(WRK_DIR / script), url,
    ]  # fmt: skip
    completed = subprocess.run(
        argv,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError(f"wrk gave no result: {completed.stdout}\n{completed.stderr}")


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing (apt-get install -y wrk)")
