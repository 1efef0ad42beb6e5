"""Redis refuses writes for a few seconds under load: no accepted task is lost, nothing dies.

One test per fault an operator meets: out of memory, a demotion to replica, a failing
background save, a restart that loads a large data set, a freeze. Each runs the api (gunicorn
and uvicorn) and a worker as real processes against a real server, submits throughout, and
then checks every answer, every accepted task and the worker process.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import httpx
import pytest

from fastapi_redis_mini_harness.http import tls_context
from fastapi_redis_mini_harness.processes import Process
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support import faults
from ._chaos import Load, Tally, collect, wait_until, worker_figures
from .conftest import Launcher

pytestmark = pytest.mark.slow

FAULT_SECONDS = 5.0
# Every task accepted before, during or after the fault is DONE this long after Redis takes
# writes again. The worker's backoff is capped at 5 s; the rest is the backlog and the load.
DONE_WITHIN = 30.0
# LOADING must outlast the probes on any machine, so its length is set by a floor, not by how
# fast this machine reads: key-load-delay is a sleep per key, so 30,000 keys at 1 ms each take
# at least 30 s. The server answers its first client about a third of the way in (it reads the
# file in chunks), which leaves 20 s or more for FAULT_SECONDS of probes. The fault then ends
# when the test says so: CONFIG SET (allowed while loading) drops the delay to zero.
FILLER_KEYS = 30_000
KEY_LOAD_DELAY_US = 1_000

Fault = Callable[[RedisServer], AbstractContextManager[None]]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True)
    server.start()
    yield server
    if server.process is not None:
        server.process.send_signal(signal.SIGCONT)  # never leave a frozen server behind
    server.close()


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """SIGSTOP: open connections, no answers, as in a partition or a stall on disk."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def loading(server: RedisServer) -> Iterator[None]:
    """A restart that reads a large data set back, answering LOADING until the test ends it."""
    server.stop()
    server.extra_args = [
        # Test-only settings both servers have: slow each key down, and answer clients
        # (with LOADING) every KB instead of every 2 MB.
        "--key-load-delay", str(KEY_LOAD_DELAY_US),
        "--loading-process-events-interval-bytes", "1024",
    ]  # fmt: skip
    server.start(until_loaded=False)
    assert still_loading(server), "the restart finished loading before the fault began"
    try:
        yield
    finally:
        server.extra_args = []
        with server.client() as client:
            client.config_set("key-load-delay", 0)
        assert wait_until(lambda: not still_loading(server), 60)


def still_loading(server: RedisServer) -> bool:
    client = server.client()
    try:
        return bool(int(client.info("persistence")["loading"]))
    finally:
        client.close()


def fill(server: RedisServer, keys: int) -> None:
    """Keys that make the data set large, written into the AOF's base so they load slowly."""
    client = server.client()
    with client.pipeline(transaction=False) as pipe:
        for n in range(keys):
            pipe.set(f"filler:{n}", "x")
        pipe.execute()
    client.bgrewriteaof()
    assert wait_until(
        lambda: (
            not any(
                int(client.info("persistence")[key])
                for key in ("aof_rewrite_in_progress", "aof_rewrite_scheduled")
            )
        ),
        30,
    )
    client.close()


def probe(service: Process, path: str, field: str = "status") -> tuple[int, str]:
    try:
        response = httpx.get(service.base_url + path, timeout=10, verify=tls_context())
    except httpx.TransportError as error:
        return 0, type(error).__name__
    return response.status_code, response.json().get(field, "")


def ride_out(
    launch: Launcher,
    server: RedisServer,
    name: str,
    fault: Fault,
    codes: set[str],
    *,
    seconds: float = FAULT_SECONDS,
    lasting: Callable[[RedisServer], bool] | None = None,
) -> None:
    """Submit throughout the fault; check the answers, every accepted task and the worker.

    The probes run for `seconds` while the fault is in force: every fault here lasts until
    the test ends it, so the window does not depend on the machine's speed. `lasting`, when
    given, confirms after each round of probes that the fault still held while they ran.
    `codes` are the error codes the api may answer with meanwhile; the first in sorted order
    must be seen at least once, in an answer or in /healthz?detail=true. The api stays ready
    throughout: it answers those 503s itself.
    """
    api = launch.api(server.url)
    worker = launch.worker(server.url, MAX_CONCURRENCY="20")
    pid = worker.pid
    load = Load(api.base_url, label=name)
    load.start()
    probes: Counter[str] = Counter()
    try:
        assert wait_until(lambda: len(load.accepted) >= 30, 30)
        with fault(server):
            began = time.monotonic()
            while time.monotonic() - began < seconds:
                ready, _ = probe(api, "/readyz")
                _, state = probe(api, "/healthz?detail=true", "redis")
                alive, _ = probe(worker, "/healthz")
                assert lasting is None or lasting(server), (
                    f"the {name} fault ended by itself {time.monotonic() - began:.1f} s in, "
                    f"before the probes were done: {dict(probes)}"
                )
                probes.update([f"api readyz {ready} {state}", f"worker healthz {alive}"])
                time.sleep(0.2)
            accepted_during = len(load.accepted)
        recovered_at = time.monotonic()
        assert wait_until(lambda: len(load.accepted) >= accepted_during + 30, 30)
    finally:
        load.stop()
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        tasks = collect(
            client, load.accepted, timeout=recovered_at + DONE_WITHIN - time.monotonic()
        )
    all_done_s = round(time.monotonic() - recovered_at, 1)
    answered = Counter(answer.status for answer in load.answers)
    refused = Counter(
        json.loads(answer.body)["error"]["code"] for answer in load.answers if answer.status == 503
    )
    tally = Tally.of(tasks)
    tally.report(
        name,
        answers=dict(answered),
        codes=dict(refused),
        probes=dict(probes),
        worker_redis_errors=worker_figures(worker)["redis_errors"],
        all_done_after_recovery_s=all_done_s,
    )
    assert tally.lost == 0
    assert tally.done == tally.accepted
    assert set(answered) <= {202, 503}, answered
    assert load.transport_errors == 0
    for answer in load.answers:
        assert "Traceback" not in answer.body
        if answer.status == 503:
            assert int(answer.retry_after or 0) > 0
    assert set(refused) <= codes, refused
    seen = set(refused) | {key.split()[-1] for key in probes if key.startswith("api readyz")}
    assert min(codes) in seen, (seen, probes)
    assert not any(key.startswith("api readyz 503") for key in probes)
    assert probes["worker healthz 200"] > 0
    assert not any(key.startswith("worker healthz 503") for key in probes)
    # The same worker process rode it out: alive, started once, no loop lost.
    assert worker.pid == pid
    assert worker.process.poll() is None
    assert worker.log.count("consuming as") == 1
    assert "Traceback" not in worker.log
    assert all_done_s <= DONE_WITHIN


def test_out_of_memory(launch: Launcher, server: RedisServer) -> None:
    ride_out(launch, server, "oom", faults.out_of_memory, {"redis_out_of_memory"})


def test_read_only_after_a_demotion(launch: Launcher, server: RedisServer) -> None:
    ride_out(launch, server, "readonly", faults.read_only, {"redis_read_only"})


def test_a_failing_background_save(launch: Launcher, server: RedisServer) -> None:
    ride_out(launch, server, "misconf", faults.cannot_persist, {"redis_cannot_persist"})


def test_a_restart_that_loads_a_large_data_set(launch: Launcher, server: RedisServer) -> None:
    fill(server, FILLER_KEYS)
    ride_out(
        launch,
        server,
        "loading",
        loading,
        {"redis_loading", "redis_unavailable"},
        lasting=still_loading,
    )


def test_a_freeze_during_submits(launch: Launcher, server: RedisServer) -> None:
    ride_out(launch, server, "freeze", frozen, {"redis_unavailable"}, seconds=3.0)
