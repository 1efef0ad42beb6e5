"""The harness's own promises: a server or a service that cannot run says so at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.processes import Process
from fastapi_redis_mini_harness.redis_server import RedisServer

pytestmark = pytest.mark.slow  # they start processes


def test_a_server_that_cannot_start_fails_at_once_with_its_console() -> None:
    server = RedisServer()
    server.extra_args = ["--no-such-option", "x"]
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=rf"port {server.port} exited with 1") as failure:
            server.start(timeout=30)
    finally:
        server.close()
    assert time.monotonic() - began < 15  # it did not wait out the 30 s
    assert "no-such-option" in str(failure.value)


def test_a_process_that_ignores_sigterm_is_killed_and_the_stop_fails(tmp_path: Path) -> None:
    stubborn = Process(
        "stubborn",
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
         " print('ready', flush=True); time.sleep(60)"],
        log_path=tmp_path / "stubborn.log",
    )  # fmt: skip
    try:
        poll(lambda: "ready" in stubborn.log, 10, 0.05, "the process never started")
        with pytest.raises(subprocess.TimeoutExpired):
            stubborn.stop(timeout=0.5)
        assert not stubborn.alive()  # SIGKILL followed the timeout
    finally:
        stubborn.close()


def test_a_port_held_by_another_server_is_never_taken_for_the_new_one() -> None:
    # Its PING would be answered, by the server already there; start() must not believe it.
    holder = RedisServer()
    holder.start()
    try:
        second = RedisServer(port=holder.port)
        began = time.monotonic()
        with pytest.raises(RuntimeError, match=f"on port {holder.port} exited"):
            second.start()
        assert time.monotonic() - began < 10
        second.close()
    finally:
        holder.close()
