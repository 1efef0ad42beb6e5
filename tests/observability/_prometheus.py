"""A real Prometheus server for tests: loopback only, a free port, a generated config."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.ports import free_port

SCRAPE_INTERVAL = "1s"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    """One scrape target and the labels a Kubernetes scrape config would attach to it."""

    job: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    # kube-state-metrics reports each object's own namespace; keep it over the target's.
    honor_labels: bool = False


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float


class QueryError(AssertionError):
    """Prometheus refused a query (bad syntax, unknown function, ...)."""


def write_config(path: Path, targets: Sequence[Target], rule_files: Sequence[Path]) -> None:
    jobs: dict[str, dict[str, Any]] = {}
    for target in targets:
        job = jobs.setdefault(
            target.job,
            {
                "job_name": target.job,
                "scrape_timeout": SCRAPE_INTERVAL,
                "honor_labels": target.honor_labels,
                "static_configs": [],
            },
        )
        job["static_configs"].append({"targets": [target.address], "labels": dict(target.labels)})
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(rule_file.resolve()) for rule_file in rule_files],
        "scrape_configs": list(jobs.values()),
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


class Prometheus:
    """Client for the HTTP query API of one running server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10.0)

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        response = self.http.get(path, params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise QueryError(f"{path} {dict(params)} -> {response.status_code}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluate an instant query; raises QueryError when Prometheus rejects it."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        return [
            Sample(labels=item["metric"], value=float(item["value"][1])) for item in data["result"]
        ]

    def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = self._get(f"/api/v1/label/{label}/values", {"match[]": match})
        return values

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._get("/api/v1/rules", {})["groups"]
        return groups

    def targets_up(self) -> dict[str, bool]:
        """job -> whether its last scrape succeeded."""
        data = self._get("/api/v1/targets", {"state": "active"})
        return {
            target["labels"]["job"]: target["health"] == "up" for target in data["activeTargets"]
        }

    def wait_for(
        self,
        expr: str,
        accept: Callable[[list[Sample]], bool],
        timeout: float = 30.0,
        what: str = "",
    ) -> list[Sample]:
        """Poll a query until `accept` holds; fail with the last answer after `timeout`."""
        last: list[Sample] = []

        def probe() -> list[Sample] | None:
            nonlocal last
            last = self.query(expr)
            return last if accept(last) else None

        return poll(probe, timeout, 0.5, lambda: f"{what or expr}: last {last}")

    def close(self) -> None:
        self.http.close()


def single_value(samples: list[Sample]) -> float | None:
    """The value of a one-sample answer, None when empty or NaN."""
    if len(samples) != 1 or math.isnan(samples[0].value):
        return None
    return samples[0].value


@contextmanager
def run_prometheus(
    binary: str, workdir: Path, targets: Sequence[Target], rule_files: Sequence[Path] = ()
) -> Iterator[Prometheus]:
    """Start Debian's prometheus on a free loopback port; stop it on exit."""
    config = workdir / "prometheus.yml"
    write_config(config, targets, rule_files)
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        _wait_ready(server, process, log_path)
        yield server
    finally:
        server.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_ready(server: Prometheus, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log_path.read_text(errors='replace')}")
        try:
            if server.http.get("/-/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"prometheus not ready in {START_TIMEOUT:.0f}s: {log_path.read_text()}")
