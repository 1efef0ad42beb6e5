"""What the chaos tests share: submitting, waiting for outcomes, counting, reading metrics."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from fastapi_redis_mini_harness.http import tls_context
from fastapi_redis_mini_harness.polling import holds_within
from fastapi_redis_mini_harness.processes import Process

from ..support.http import client_per_thread

FINAL = frozenset({"DONE", "FAILED", "CANCELLED"})
Task = dict[str, Any]


wait_until = holds_within  # callers assert on it with the log of the process they waited on


def submit_all(client: httpx.Client, bodies: Iterable[Mapping[str, Any]]) -> list[str]:
    """Submit each body and return the task ids; every one must be accepted (202)."""

    with client_per_thread(client) as own:

        def submit(body: Mapping[str, Any]) -> str:
            response = own().post("/tasks", json=dict(body))
            assert response.status_code == 202, response.text
            task_id: str = response.json()["task_id"]
            return task_id

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(submit, bodies))


def collect(client: httpx.Client, task_ids: Iterable[str], timeout: float) -> dict[str, Task]:
    """Each task as GET /tasks/{id} shows it once final, or as it stands when time runs out."""
    deadline = time.monotonic() + timeout

    def final(task_id: str) -> Task:
        task: Task = {}
        while True:
            remaining = deadline - time.monotonic()
            wait = max(0.1, min(remaining, 10.0))
            try:
                response = own().get(f"/tasks/{task_id}", params={"wait": wait}, timeout=wait + 10)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 200:
                task = response.json()
                if task["status"] in FINAL:
                    return task
            if remaining <= 0:
                return task or {"task_id": task_id, "status": "UNKNOWN"}
            if response is None or response.status_code != 200:
                time.sleep(0.2)

    with client_per_thread(client) as own, ThreadPoolExecutor(16) as pool:
        return {task["task_id"]: task for task in pool.map(final, task_ids)}


@dataclass
class Answer:
    status: int
    body: str
    retry_after: str | None
    content_type: str


@dataclass
class Load:
    """One client submitting tasks back to back, keeping every answer; bounded in count."""

    base_url: str
    limit: int = 3000
    label: str = "outage"  # the prompts' prefix, so two loads never share a cached result
    accepted: list[str] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    transport_errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=15) as client:
            for n in range(self.limit):
                if self._stop.is_set():
                    return
                body = {"prompt": f"{self.label} {n}", "params": {"duration": 0.1}}
                try:
                    response = client.post("/tasks", json=body)
                except httpx.TransportError:
                    self.transport_errors += 1
                    time.sleep(0.05)
                    continue
                self.answers.append(
                    Answer(
                        response.status_code,
                        response.text,
                        response.headers.get("retry-after"),
                        response.headers.get("content-type", ""),
                    )
                )
                if response.status_code == 202:
                    self.accepted.append(response.json()["task_id"])
                time.sleep(0.01)


@dataclass(frozen=True)
class Tally:
    """The figures every chaos test prints: accepted, done, failed, lost (accepted, not final)."""

    accepted: int
    done: int
    failed: int
    cancelled: int

    @classmethod
    def of(cls, tasks: Mapping[str, Task]) -> Tally:
        statuses = Counter(task["status"] for task in tasks.values())
        return cls(len(tasks), statuses["DONE"], statuses["FAILED"], statuses["CANCELLED"])

    @property
    def lost(self) -> int:
        return self.accepted - self.done - self.failed - self.cancelled

    def report(self, name: str, **figures: object) -> None:
        extra = "".join(f" {key}={value}" for key, value in figures.items())
        print(
            f"\nreliability[{name}]: accepted={self.accepted} done={self.done} "
            f"failed={self.failed} lost={self.lost}{extra}"
        )


def scrape(service: Process) -> str:
    return httpx.get(service.metrics_url, timeout=5, verify=tls_context()).text


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples in a Prometheus exposition, filtered by labels."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    for match in pattern.finditer(text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(2))
    return total


def worker_figures(service: Process) -> dict[str, int]:
    """A worker's own count of what it did, from its /metrics."""
    text = scrape(service)
    return {
        "done": int(metric(text, "fastapi_redis_mini_tasks_finished_total", status="DONE")),
        "failed": int(metric(text, "fastapi_redis_mini_tasks_finished_total", status="FAILED")),
        "reclaimed": int(metric(text, "fastapi_redis_mini_tasks_reclaimed_total")),
        "in_flight": int(metric(text, "fastapi_redis_mini_tasks_in_flight")),
        "redis_errors": int(metric(text, "fastapi_redis_mini_redis_errors_total")),
    }


def worker_figures_once_counted(
    services: Sequence[Process], done: int, within: float = 10.0
) -> list[dict[str, int]]:
    """worker_figures of each worker once they have counted `done` tasks DONE between them, or
    as they are `within` seconds on. A worker counts an outcome when finish.lua's reply reaches
    it, which can be a moment after a client saw the task DONE in Redis: a scrape at once may
    miss the last ones.
    """
    deadline = time.monotonic() + within
    figures = [worker_figures(service) for service in services]
    while sum(f["done"] for f in figures) < done and time.monotonic() < deadline:
        time.sleep(0.1)
        figures = [worker_figures(service) for service in services]
    return figures


def in_flight(service: Process) -> int:
    try:
        answer = httpx.get(service.base_url + "/healthz", timeout=2, verify=tls_context())
        return int(answer.json()["in_flight"])
    except (httpx.HTTPError, KeyError, ValueError):
        return -1
