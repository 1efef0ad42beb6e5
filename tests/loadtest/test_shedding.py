"""The locustfile counts load the service sheds on purpose (429 or 503 with Retry-After) as
shed, not failed; the same answers without Retry-After stay failures.

The service is a stand-in on loopback that sheds every other submit, so the test does not
depend on filling a real backlog.
"""

from __future__ import annotations

import csv
import itertools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import FAST_MIX, run_locust

pytestmark = pytest.mark.slow


class SheddingApi(ThreadingHTTPServer):
    retry_after: bool
    submits: Iterator[int]


class _Handler(BaseHTTPRequestHandler):
    server: SheddingApi

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        n = next(self.server.submits)
        if n % 2:
            headers = {"Retry-After": "0"} if self.server.retry_after else {}
            self._send(429 if n % 4 == 1 else 503, {"error": {"code": "shed"}}, headers)
        else:
            self._send(202, {"task_id": f"t{n}", "status": "PENDING", "cached": False})

    def do_GET(self) -> None:
        task_id = self.path.split("/tasks/")[1].split("?")[0]
        self._send(200, {"task_id": task_id, "status": "DONE"})

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return


def serve(retry_after: bool) -> tuple[SheddingApi, threading.Thread]:
    server = SheddingApi(("127.0.0.1", 0), _Handler)
    server.retry_after = retry_after
    server.submits = itertools.count()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def run_against(retry_after: bool, tmp_path: Path) -> dict[tuple[str, str], dict[str, str]]:
    server, thread = serve(retry_after)
    try:
        host, port = server.server_address[:2]
        prefix = tmp_path / "run"
        run_locust(
            f"http://{host!s}:{port}",
            ["--headless", "-u", "2", "-r", "2", "-t", "3s", "--stop-timeout", "5",
             "--csv", str(prefix), "--only-summary", *FAST_MIX],
            cwd=tmp_path,
            timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    with Path(f"{prefix}_stats.csv").open(newline="") as handle:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}


def test_429_and_503_with_retry_after_are_counted_as_shed_not_failed(tmp_path: Path) -> None:
    rows = run_against(True, tmp_path)
    assert int(rows[("TASK", "task shed")]["Request Count"]) > 0
    assert int(rows[("POST", "POST /tasks")]["Failure Count"]) == 0
    assert int(rows[("TASK", "task end-to-end")]["Request Count"]) > 0


def test_429_and_503_without_retry_after_are_failures(tmp_path: Path) -> None:
    rows = run_against(False, tmp_path)
    assert ("TASK", "task shed") not in rows
    assert int(rows[("POST", "POST /tasks")]["Failure Count"]) > 0
