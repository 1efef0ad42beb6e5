"""The api and the worker as real processes, the way they run in production, and any other child.

Every child runs in a session of its own with its output in a log file, so a signal reaches
all of its processes (gunicorn's master and its workers) and nothing else, and a stop is
bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from signal import SIGKILL, SIGTERM
from types import MappingProxyType

import httpx

from .http import tls_context
from .polling import poll
from .ports import free_port
from .redis_server import RedisServer

API_MODULE = "fastapi_redis_mini.api"
WORKER_MODULE = "fastapi_redis_mini.worker"
STOP_TIMEOUT = 30.0
START_TIMEOUT = 30.0

# What a service started here runs with unless the caller says otherwise: text logs a person
# reads, one web worker on a shared machine, and stops bounded at 10 s rather than the
# production 30 to 35 s, so a test never waits out a drain.
LOCAL_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "LOG_FORMAT": "text",
        "WEB_CONCURRENCY": "1",
        "CLAIM_IDLE": "30",
        "SHUTDOWN_GRACE": "10",
        "DRAIN_TIMEOUT": "10",
    }
)
# The service's own defaults, as production runs it: what a measurement wants.
SERVICE_DEFAULTS: Mapping[str, str] = MappingProxyType({})


def service_env(redis_url: str, **variables: str) -> dict[str, str]:
    """This process's environment for a service on `redis_url`, plus `variables`.

    OTEL_*, PROMETHEUS_* and WEB_CONCURRENCY from the calling shell are left out: a run
    states its own, and a stray exporter would change what it measures or sees.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "PROMETHEUS_", "WEB_CONCURRENCY"))
    }
    env.update(REDIS_URL=redis_url, HOST="127.0.0.1")
    env.update(variables)
    return env


class Process:
    """A child process with its output in `log_path` (None: this process's own output).

    `port` is where it serves HTTP on 127.0.0.1; 0 for one that does not.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        log_path: Path | None = None,
        cwd: Path | None = None,
        port: int = 0,
        metrics_port: int = 0,
    ) -> None:
        self.name = name
        self.port = port
        # Where its /metrics is: the api's own port for it, the worker's only port.
        self.metrics_port = metrics_port or port
        self.log_path = log_path
        self.started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            log = None if log_path is None else stack.enter_context(log_path.open("ab"))
            self.process = subprocess.Popen(
                list(argv),
                env=None if env is None else dict(env),
                cwd=cwd,
                stdout=log,
                stderr=None if log is None else subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_until_answers(self, path: str, timeout: float = START_TIMEOUT) -> None:
        """Until GET `path` answers 200; fails at once, with the log, if the process exits."""

        def answers() -> bool:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail(80)}"
                )
            try:
                return client.get(self.base_url + path).status_code == 200
            except httpx.HTTPError:
                return False

        with httpx.Client(timeout=1.0, verify=tls_context()) as client:
            poll(answers, timeout, 0.1, lambda: f"{self.name} did not answer {path}:\n{self.log}")

    @property
    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    def signal(self, signum: int = SIGTERM) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT, signum: int = SIGTERM) -> int:
        """`signum` (SIGTERM), then wait; returns the exit code.

        One still running after `timeout` is killed, and TimeoutExpired raised: a stop that
        needs SIGKILL is a defect to see, not to wait out.
        """
        self.signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        self.signal(SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.alive():
            self.kill()


def stop_together(processes: Sequence[Process], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM all first, then wait for each: their drains overlap instead of adding up."""
    for process in processes:
        process.signal()
    for process in processes:
        process.stop(timeout)


def _start_service(
    module: str,
    redis_url: str,
    variables: Mapping[str, str],
    *,
    name: str,
    port: int,
    metrics_port: int = 0,
    ready_path: str | None,
    log_path: Path | None,
    cwd: Path | None,
) -> Process:
    """`python -m module`, logging to `log_path` or a new temporary file; with a
    `ready_path`, returned once that answers."""
    if log_path is None:
        handle, path = tempfile.mkstemp(prefix=f"frm-{name}-", suffix=".log")
        os.close(handle)
        log_path = Path(path)
    process = Process(
        name,
        [sys.executable, "-m", module],
        service_env(redis_url, **variables),
        log_path=log_path,
        cwd=cwd,
        port=port,
        metrics_port=metrics_port,
    )
    if ready_path is not None:
        try:
            process.wait_until_answers(ready_path)
        except BaseException:
            process.close()  # a service that never became ready must not outlive its caller
            raise
    return process


def start_api(
    redis_url: str,
    env: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    wait: bool = True,
    defaults: Mapping[str, str] = LOCAL_DEFAULTS,
    name: str = "api",
    log_path: Path | None = None,
    cwd: Path | None = None,
    **more: str,
) -> Process:
    """Start `python -m fastapi_redis_mini.api` on `port` (a free one by default).

    Its environment is `service_env()` with `defaults`, then `env` and `more` over them;
    with `wait`, returns once /readyz answers. The log goes to `log_path` (a temporary file
    by default); `cwd` is where it starts, which decides what TASK_HANDLER can import.
    """
    port = port or free_port()
    variables = {
        **defaults,
        "PORT": str(port),
        "API_METRICS_PORT": str(free_port()),
        # Each api counts into its own directory (the api empties it at start), unless the
        # caller names one.
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="frm-metrics-"),
        **(env or {}),
        **more,
    }
    return _start_service(
        API_MODULE,
        redis_url,
        variables,
        name=name,
        port=port,
        metrics_port=int(variables["API_METRICS_PORT"]),
        ready_path="/readyz" if wait else None,
        log_path=log_path,
        cwd=cwd,
    )


def start_worker(
    redis_url: str,
    env: Mapping[str, str] | None = None,
    *,
    metrics_port: int | None = None,
    wait: bool = True,
    defaults: Mapping[str, str] = LOCAL_DEFAULTS,
    name: str = "worker",
    log_path: Path | None = None,
    cwd: Path | None = None,
    **more: str,
) -> Process:
    """Start `python -m fastapi_redis_mini.worker`, serving its metrics on `metrics_port`.

    The environment and the log are as for `start_api`; with `wait`, returns once /healthz
    answers (the worker's /readyz waits for Redis as well).
    """
    port = metrics_port or free_port()
    return _start_service(
        WORKER_MODULE,
        redis_url,
        {**defaults, "METRICS_PORT": str(port), **(env or {}), **more},
        name=name,
        port=port,
        ready_path="/healthz" if wait else None,
        log_path=log_path,
        cwd=cwd,
    )


class Workspace:
    """One directory for a run's logs and data; every child and server is stopped on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._processes: list[Process] = []
        self._servers: list[RedisServer] = []

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def own(self, process: Process) -> Process:
        """Stop `process` with the rest when the workspace closes."""
        self._processes.append(process)
        return process

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        port: int = 0,
    ) -> Process:
        """Start `argv` with its log in `<root>/<name>.log`; `env` is its whole environment."""
        return self.own(Process(name, argv, env, log_path=self.log_path(name), cwd=cwd, port=port))

    def redis(self, name: str = "redis", *, appendfsync: str | None = None) -> RedisServer:
        """A started server with its data in `<root>/<name>`: without persistence, or with
        the append-only file and this appendfsync."""
        server = RedisServer(
            appendonly=appendfsync is not None,
            appendfsync=appendfsync or "everysec",
            directory=self.root / name,
        )
        self._servers.append(server)
        server.start()
        return server

    def close(self) -> None:
        """Stop the children together (killing what outlives the stop timeout), then the servers."""
        try:
            stop_together([p for p in reversed(self._processes) if p.alive()])
        except subprocess.TimeoutExpired:
            pass  # stop() killed it; the rest are closed below
        finally:
            for process in self._processes:
                process.close()
            for server in self._servers:
                server.close()
            self._processes.clear()
            self._servers.clear()


@contextlib.contextmanager
def workspace(keep: Path | None = None) -> Iterator[Workspace]:
    """A Workspace in `keep` (left in place afterwards) or in a temporary directory."""
    root = keep or Path(tempfile.mkdtemp(prefix="frm-run-"))
    root.mkdir(parents=True, exist_ok=True)
    space = Workspace(root)
    try:
        yield space
    finally:
        space.close()
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
