"""Redis is killed and restarted under load, with AOF: no task that got a 202 is lost."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from fastapi_redis_mini_harness.http import tls_context
from fastapi_redis_mini_harness.redis_server import RedisServer

from ._chaos import Load, Tally, collect, in_flight, wait_until, worker_figures
from .conftest import Launcher

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 3.0


@pytest.fixture(params=["everysec", "always"])
def aof_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True, appendfsync=request.param)
    server.start()
    yield server
    server.close()


def test_redis_restart_under_load_loses_no_accepted_task(
    aof_server: RedisServer, launch: Launcher
) -> None:
    api = launch.api(aof_server.url, WEB_CONCURRENCY="2")
    worker = launch.worker(aof_server.url, MAX_CONCURRENCY="20", CLAIM_IDLE="3")
    load = Load(api.base_url)
    load.start()
    probes: Counter[str] = Counter()
    try:
        assert wait_until(lambda: len(load.accepted) >= 50, 20)
        aof_server.stop(kill=True)
        outage_began = time.monotonic()
        while time.monotonic() - outage_began < OUTAGE_SECONDS:
            ready = httpx.get(
                api.base_url + "/readyz", timeout=10, verify=tls_context()
            ).status_code
            alive = httpx.get(
                api.base_url + "/healthz", timeout=10, verify=tls_context()
            ).status_code
            detail = httpx.get(
                api.base_url + "/healthz?detail=true", timeout=10, verify=tls_context()
            ).json()
            worker_ready = httpx.get(
                worker.base_url + "/readyz", timeout=10, verify=tls_context()
            ).status_code
            probes.update([f"api readyz {ready}", f"api healthz {alive}"])
            probes.update([f"api redis {detail['redis']}", f"worker readyz {worker_ready}"])
            time.sleep(0.2)
        accepted_before = len(load.accepted)
        aof_server.start()
        back_at = time.monotonic()
        assert wait_until(lambda: len(load.accepted) >= accepted_before + 50, 30)
        first_202_after_s = _first_accept_delay(load, accepted_before, back_at)
    finally:
        load.stop()

    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        tasks = collect(client, load.accepted, timeout=60)
    all_done_after = time.monotonic() - back_at
    statuses = Counter(answer.status for answer in load.answers)
    figures = worker_figures(worker)
    tally = Tally.of(tasks)
    tally.report(
        f"redis-restart-aof-{aof_server.appendfsync}",
        answers=dict(statuses),
        probes=dict(probes),
        worker_redis_errors=figures["redis_errors"],
        attempts=dict(Counter(task["attempts"] for task in tasks.values())),
        accepting_again_after_s=first_202_after_s,
        all_final_after_restart_s=round(all_done_after, 1),
    )
    assert tally.lost == 0
    assert tally.done == tally.accepted
    # During the outage the api refused cleanly: 503, Retry-After, the JSON error shape.
    assert statuses[503] > 0
    assert set(statuses) <= {202, 503}, statuses
    assert load.transport_errors == 0
    for answer in load.answers:
        assert "Traceback" not in answer.body
        if answer.status == 503:
            assert answer.retry_after is not None
            assert int(answer.retry_after) > 0
            assert answer.content_type == "application/json"
            assert '"code":"redis_unavailable"' in answer.body
    # Both stay ready (the api answers its own 503s), live, and say what Redis is doing.
    assert probes["api readyz 503"] == 0
    assert probes["api healthz 503"] == 0
    assert probes["api redis redis_unavailable"] > 0
    assert probes["worker readyz 503"] == 0
    # The worker rode it out: the same process, which saw the errors and carried on.
    assert worker.process.poll() is None
    assert worker.log.count("consuming as") == 1
    assert figures["redis_errors"] > 0


def _first_accept_delay(load: Load, accepted_before: int, back_at: float) -> float:
    """Seconds from the restart until the load's next 202, to the nearest tenth."""
    wait_until(lambda: len(load.accepted) > accepted_before, 30, interval=0.02)
    return round(time.monotonic() - back_at, 1)


def timed(call: Callable[[], httpx.Response]) -> tuple[int | None, float]:
    """The status of a request and how long it took; None when the client gave up."""
    asked = time.monotonic()
    try:
        status: int | None = call().status_code
    except httpx.TimeoutException:
        status = None
    return status, round(time.monotonic() - asked, 1)


def test_a_frozen_redis_gets_clients_a_prompt_503_not_a_hung_request(launch: Launcher) -> None:
    # SIGSTOP: connections stay open and nothing answers, as in a network partition or a
    # Redis stalled on its disk; unlike a crash, no error arrives to fail fast on.
    # The api times a command out after REDIS_SOCKET_TIMEOUT (2 s) and retries once: about 4 s.
    answer_within, give_up_after = 8.0, 15.0
    server = RedisServer(appendonly=True)
    server.start()
    assert server.process is not None
    try:
        api = launch.api(server.url)
        # A reply lost in the freeze (the worker's call timed out, Redis ran it on waking)
        # leaves its task RUNNING on this worker until it is reclaimed, CLAIM_IDLE later: at
        # 5 s that is well inside the 30 s the task has to end.
        launch.worker(server.url, CLAIM_IDLE="5")
        with httpx.Client(base_url=api.base_url, timeout=give_up_after) as client:
            before = client.post("/tasks", json={"prompt": "before the freeze"})
            server.process.send_signal(signal.SIGSTOP)
            submit = timed(lambda: client.post("/tasks", json={"prompt": "during the freeze"}))
            ready = timed(lambda: client.get("/readyz"))
            server.process.send_signal(signal.SIGCONT)
            tasks = collect(client, [before.json()["task_id"]], timeout=30)
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.close()
    tally = Tally.of(tasks)
    tally.report("redis-frozen", submit_status_and_s=submit, readyz_status_and_s=ready)
    assert tally.lost == 0
    # Not an answer after socket timeouts and retries: a prompt 503 the client can act on.
    assert submit[0] == 503
    assert submit[1] < answer_within


def test_tasks_whose_take_reply_was_lost_in_a_freeze_run_long_before_claim_idle(
    launch: Launcher,
) -> None:
    """Redis freezes with three tasks waiting and the worker's take on its way. The worker times
    the take out and drops that connection; Redis runs the take when it wakes, so the tasks are
    delivered to this worker, RUNNING, in a reply nobody reads. After a failed read the worker
    looks for such entries of its own, so the tasks run seconds after Redis wakes, not once
    CLAIM_IDLE (60 s here) has passed; and since no handler ran them, side by side rather than
    one at a time as suspects."""
    socket_timeout, blocking_read = 4.0, 1.0
    server = RedisServer()
    server.start()
    assert server.process is not None
    redis_frozen = False
    try:
        api = launch.api(server.url)
        # MAX_CONCURRENCY 6: a take holds up to half of it, so one take carries all three.
        worker = launch.worker(
            server.url,
            CLAIM_IDLE="60",
            REDIS_SOCKET_TIMEOUT=str(socket_timeout),
            MAX_CONCURRENCY="6",
        )
        # Reading: its group made and its blocking reads going round.
        assert wait_until(lambda: "consuming as" in worker.log, 30), worker.log
        time.sleep(blocking_read)
        with httpx.Client(base_url=api.base_url, timeout=15) as client:
            # The worker is held while the tasks are queued: longer than its blocking read, so
            # that no read of it waits in Redis to be handed a task at once, and shorter than
            # its socket timeout, so that it keeps its connection and sends its next take on it.
            worker.process.send_signal(signal.SIGSTOP)
            try:
                time.sleep(blocking_read + 0.3)
                params = {"duration": 2}
                bodies = [{"prompt": f"delivered unheard {i}", "params": params} for i in range(3)]
                submitted = [client.post("/tasks", json=body) for body in bodies]
                assert [r.status_code for r in submitted] == [202] * 3, [r.text for r in submitted]
                server.process.send_signal(signal.SIGSTOP)
                redis_frozen = True
            finally:
                worker.process.send_signal(signal.SIGCONT)
            # The take has timed out, and its retry too (on a new connection, which the frozen
            # server never answers).
            assert wait_until(lambda: "redis cannot be read" in worker.log, 30), worker.log
            server.process.send_signal(signal.SIGCONT)
            redis_frozen = False
            woke = time.monotonic()
            ids = [r.json()["task_id"] for r in submitted]
            tasks = collect(client, ids, timeout=30)
            done_after = time.monotonic() - woke
    finally:
        if redis_frozen:
            server.process.send_signal(signal.SIGCONT)
        server.close()
    tally = Tally.of(tasks)
    tally.report("take-reply-lost", done_after_wake_s=round(done_after, 1), claim_idle_s=60)
    assert tally.done == 3, f"{tasks}\nworker log:\n{worker.log}"
    claimed_back = re.findall(r"claimed back (\d+) entries delivered by a read", worker.log)
    assert sum(int(n) for n in claimed_back) == 3, worker.log
    # The take nobody heard had started them: each ran once, as its second attempt.
    assert [task["attempts"] for task in tasks.values()] == [2, 2, 2]
    # Side by side: their runs of 2 s overlap, none waited for another to end.
    starts = sorted(task["started_at"] for task in tasks.values())
    assert starts[-1] - starts[0] < 1.0, starts
    assert "run alone" not in worker.log, worker.log


def test_a_restart_without_persistence_mid_run_stops_the_runs_and_the_worker_goes_on(
    launch: Launcher,
) -> None:
    """Redis restarts empty (no AOF, no RDB) while the worker runs two tasks: their stream,
    group and hashes are gone. Keeping them alive finds no group: the runs are no longer the
    worker's and are stopped, the worker stays up, and a task submitted after the restart is
    done."""
    server = RedisServer()
    server.start()
    try:
        api = launch.api(server.url)
        # Keep-alive every second (CLAIM_IDLE / 3), so it meets the empty Redis at once.
        worker = launch.worker(server.url, CLAIM_IDLE="3", MAX_CONCURRENCY="2")
        with httpx.Client(base_url=api.base_url, timeout=15) as client:
            for i in range(2):
                body = {"prompt": f"running at the restart {i}", "params": {"duration": 20}}
                assert client.post("/tasks", json=body).status_code == 202
            assert wait_until(lambda: in_flight(worker) == 2, 20), worker.log
            server.restart(kill=True)
            assert wait_until(lambda: in_flight(worker) == 0, 20), worker.log
            after = client.post("/tasks", json={"prompt": "after the restart"})
            assert after.status_code == 202, after.text
            task_id = after.json()["task_id"]
            tasks = collect(client, [task_id], timeout=30)
    finally:
        server.close()
    assert worker.process.poll() is None, worker.log
    assert tasks[task_id]["status"] == "DONE", worker.log
    assert worker.log.count("entry no longer this worker's") == 2, worker.log
