"""Stop an api pod under load with the shutdown settings the chart renders, and fail nothing.

Two api processes run with the chart's settings ConfigMap as their environment, behind a TCP
balancer on loopback standing in for the Service (kube-proxy): it spreads new connections
over the ready endpoints and leaves established ones where they are. One pod is stopped the
way the kubelet stops it: its endpoint goes (after a propagation delay), the rendered preStop
command runs, SIGTERM goes to the container's first process, and SIGKILL would follow at
terminationGracePeriodSeconds. wrk and long-polling clients keep the load on throughout, and
every one of their requests must succeed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fastapi_redis_mini_harness.processes import Process, start_api

from ..support import REPO_ROOT
from ..support.tools import require_tool
from .helm import only, pod_spec, render_set

pytestmark = pytest.mark.slow

# How long endpoint removal takes to reach every node's kube-proxy in this model; the chart's
# preStop pause must cover it.
PROPAGATION_SECONDS = 1.0
LOAD_BEFORE_STOP_SECONDS = 2.0
LOAD_AFTER_EXIT_SECONDS = 2.0
LONG_POLL_SECONDS = 2
LONG_POLL_CLIENTS = 4


class Balancer:
    """New connections round-robin over the ready backends; open ones stay where they are."""

    def __init__(self, backends: list[int]) -> None:
        self.ready = list(backends)
        self.connections: Counter[int] = Counter()
        self.refused = 0
        self._turn = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def __enter__(self) -> Balancer:
        self._thread.start()
        assert self._started.wait(10), "the balancer did not start"
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _close(self) -> None:
        self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def remove(self, backend: int) -> None:
        self._loop.call_soon_threadsafe(self.ready.remove, backend)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()

    async def _handle(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        backend = self.ready[self._turn % len(self.ready)]
        self._turn += 1
        try:
            backend_reader, upstream = await asyncio.open_connection("127.0.0.1", backend)
        except OSError:
            self.refused += 1
            client.close()
            return
        self.connections[backend] += 1
        await asyncio.gather(_pipe(client_reader, upstream), _pipe(backend_reader, client))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def wrk_report(output: str) -> dict[str, int]:
    requests = re.search(r"(\d+) requests in", output)
    assert requests, output
    figures = {"requests": int(requests.group(1)), "non_2xx": 0}
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    for name, value in zip(
        ("connect", "read", "write", "timeout"),
        errors.groups() if errors else (0, 0, 0, 0),
        strict=True,
    ):
        figures[name] = int(value)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        figures["non_2xx"] = int(non_2xx.group(1))
    return figures


class LongPollers:
    """Clients that submit a task and long-poll it over kept-alive connections, until stopped."""

    def __init__(self, base_url: str, clients: int, deadline: float) -> None:
        self.base_url = base_url
        self.deadline = deadline
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(clients)]

    def __enter__(self) -> LongPollers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=LONG_POLL_SECONDS + 15)

    def _run(self, client_number: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            round_number = 0
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                round_number += 1
                body = {"prompt": f"drain {client_number} {round_number}"}
                try:
                    submitted = client.post("/tasks", json=body)
                    submitted.raise_for_status()
                    task_id = submitted.json()["task_id"]
                    polled = client.get(f"/tasks/{task_id}?wait={LONG_POLL_SECONDS}")
                    polled.raise_for_status()
                    self.answered += 2
                except httpx.HTTPError as error:
                    self.failures.append(f"{type(error).__name__}: {error}")


# The late long-poll waits this long past SIGTERM, so the drain has something to answer.
LATE_WAIT_AFTER_SIGTERM = 2


def late_long_poll(pod_url: str, pause: float, answers: list[int]) -> None:
    with httpx.Client(base_url=pod_url, timeout=60) as client:
        task_id = client.post("/tasks", json={"prompt": "in flight at SIGTERM"}).json()["task_id"]
        wait = pause + LATE_WAIT_AFTER_SIGTERM
        answers.append(client.get(f"/tasks/{task_id}?wait={wait:g}").status_code)


@pytest.fixture
def chart_api() -> dict[str, object]:
    """The api's settings, preStop command and grace period, as the chart renders them."""
    objects = render_set("defaults")
    spec = pod_spec(only(objects, "Deployment", "api"))
    (container,) = spec["containers"]
    return {
        "settings": only(objects, "ConfigMap", "config")["data"],
        "pre_stop": container["lifecycle"]["preStop"]["exec"]["command"],
        "grace": float(spec["terminationGracePeriodSeconds"]),
    }


@pytest.fixture
def two_pods(
    redis_url: str, chart_api: dict[str, object], tmp_path: Path
) -> Iterator[list[tuple[Process, dict[str, str]]]]:
    pods: list[tuple[Process, dict[str, str]]] = []
    try:
        for name in ("a", "b"):
            pod_tmp = tmp_path / name  # the pod's own /tmp (an emptyDir)
            pod_tmp.mkdir()
            env = {
                **dict(chart_api["settings"]),  # type: ignore[call-overload]
                "REDIS_URL": redis_url,  # the test's Redis, without a password
                "HOST": "127.0.0.1",
                "TMPDIR": str(pod_tmp),
                "PROMETHEUS_MULTIPROC_DIR": str(pod_tmp / "metrics"),
            }
            env.pop("PORT")
            pods.append((start_api(redis_url, env), env))
        yield pods
    finally:
        for service, _ in pods:
            service.close()


def test_stopping_an_api_pod_under_load_fails_no_request(
    redis_url: str,
    chart_api: dict[str, object],
    two_pods: list[tuple[Process, dict[str, str]]],
) -> None:
    wrk = require_tool("wrk", "wrk")
    pre_stop = [str(part) for part in chart_api["pre_stop"]]  # type: ignore[attr-defined]
    grace = float(chart_api["grace"])  # type: ignore[arg-type]
    pause = float(pre_stop[-1])
    drain = float(chart_api["settings"]["DRAIN_TIMEOUT"])  # type: ignore[index]
    assert pause > PROPAGATION_SECONDS, "the preStop pause must outlast endpoint propagation"
    (leaving, leaving_env), (staying, _) = two_pods
    ports = [int(s.base_url.rsplit(":", 1)[1]) for s, _ in two_pods]
    seed = httpx.post(f"{staying.base_url}/tasks", json={"prompt": "read under load"})
    task_id = seed.json()["task_id"]

    load_seconds = (
        LOAD_BEFORE_STOP_SECONDS + pause + LONG_POLL_SECONDS + 3 + LOAD_AFTER_EXIT_SECONDS
    )
    late_answers: list[int] = []
    with Balancer(ports) as service:
        base = f"http://127.0.0.1:{service.port}"
        wrk_run = subprocess.Popen(
            [
                wrk,
                "-t2",
                "-c8",
                "--timeout",
                "10s",
                f"-d{int(load_seconds)}s",
                f"{base}/tasks/{task_id}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        with LongPollers(base, LONG_POLL_CLIENTS, time.monotonic() + load_seconds) as pollers:
            time.sleep(LOAD_BEFORE_STOP_SECONDS)
            served_before = service.connections[ports[0]]
            # A request that reached the pod just before its endpoint went, still in flight
            # when SIGTERM comes: the drain must answer it.
            in_flight = threading.Thread(
                target=late_long_poll, args=(leaving.base_url, pause, late_answers)
            )
            in_flight.start()
            # The kubelet: endpoints go, the preStop hook runs, then SIGTERM to PID 1.
            stopping = time.monotonic()
            threading.Timer(PROPAGATION_SECONDS, service.remove, [ports[0]]).start()
            hook = [sys.executable if pre_stop[0] == "python" else pre_stop[0], *pre_stop[1:]]
            subprocess.run(hook, env=leaving_env, cwd=REPO_ROOT, check=True, timeout=grace)
            os.kill(leaving.pid, signal.SIGTERM)
            try:
                exit_code = leaving.process.wait(timeout=grace - (time.monotonic() - stopping))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the api outlived terminationGracePeriodSeconds ({grace} s)")
            stopped_in = time.monotonic() - stopping
            in_flight.join(timeout=grace)
        output, _ = wrk_run.communicate(timeout=load_seconds + 30)
    figures = wrk_report(output)
    print(
        f"\napi drain: preStop={pause:g}s drainTimeout={drain:g}s grace={grace:g}s "
        f"stopped_in={stopped_in:.1f}s exit={exit_code} wrk={figures} "
        f"long_poll_answers={pollers.answered} failures={len(pollers.failures)} "
        f"connections={dict(service.connections)} refused={service.refused}"
    )
    assert exit_code == 0, leaving.log
    assert late_answers == [200], "the request in flight at SIGTERM was not answered"
    assert pause + LATE_WAIT_AFTER_SIGTERM <= stopped_in < grace
    assert served_before > 0, "the stopped pod served nothing: the test proved nothing"
    assert figures["requests"] > 0
    assert pollers.answered > 0
    assert pollers.failures == []
    assert {k: v for k, v in figures.items() if k not in ("requests",)} == {
        "non_2xx": 0,
        "connect": 0,
        "read": 0,
        "write": 0,
        "timeout": 0,
    }
    assert service.refused == 0
