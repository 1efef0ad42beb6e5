"""Locust users for fastapi-redis-mini: submit tasks, long-poll them to the end, time both.

Run it against a local service (web UI on :8089):

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

or headless:

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 60s

Every user loops: POST /tasks, then GET /tasks/{id}?wait=S until the task is DONE, FAILED or
CANCELLED, then thinks for a while. Besides the HTTP rows, the statistics show one row per task
outcome with request type TASK:

    task end-to-end              submit -> terminal state, for tasks a worker ran
    task end-to-end (cache hit)  the POST itself answered DONE from the result cache
    task end-to-end (coalesced)  submit -> terminal state, for a POST that single-flight
                                 joined to an identical task already in flight: one run
                                 answers several users, so this row is not counted as runs
    task shed                    a 429 or 503 with Retry-After: the service refusing load as
                                 designed and saying when to come back; the user waits that
                                 long, and it is not a failure (a 429 or 503 without
                                 Retry-After is one)
    task first output            submit -> the first output event, for streamed tasks

With --stream-share above 0, that share of tasks is followed through GET /tasks/{id}/events
(Server-Sent Events) instead of long-polls, to the final event; the stream's own row times
the whole connection.

The traffic mix is set with these options. Each also reads an environment variable,
LOCUST_ plus the option in upper case (--unique-share -> LOCUST_UNIQUE_SHARE), and all of them
appear in the web UI's start form. Defaults in brackets.

    --unique-share      share of submissions with a never-seen prompt [0.5]
    --repeated-prompts  size of the pool the other prompts are drawn from [20]
    --duration-dist     fixed | uniform | exponential [exponential]
    --duration-mean     mean simulated task duration, seconds [0.2]
    --duration-max      cap on any one duration, seconds [2.0]
    --failure-share     share of submissions asking the handler to fail [0]
    --poll-wait         long-poll window per GET, seconds [10]
    --task-deadline     give up on a task after this long, seconds [120]
    --think-min/-max    pause between two tasks of one user, seconds [0.5 / 2.0]
    --api-key           sent as X-API-Key when the service has API_KEYS [none]
    --stream-share      share of tasks followed through their event stream [0]

Repeated prompts always carry the same params, so after their first run they hit the cache.
Submissions asked to fail always use a unique prompt, and a task that ends FAILED because it was
asked to is a success here: a failure row always means the service misbehaved.

The file imports nothing from the repository, so the Helm chart can mount it as it is.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import gevent
from locust import events
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.user import task

TERMINAL = frozenset({"DONE", "FAILED", "CANCELLED"})
TASK_REQUEST_TYPE = "TASK"
END_TO_END = "task end-to-end"
END_TO_END_CACHED = "task end-to-end (cache hit)"
END_TO_END_COALESCED = "task end-to-end (coalesced)"
SHED = "task shed"
# Answers that shed load on purpose, when they say when to retry.
SHED_STATUSES = frozenset({429, 503})
RETRY_AFTER_MAX = 30.0
SUBMIT_NAME = "POST /tasks"
POLL_NAME = "GET /tasks/{id}?wait"
EVENTS_NAME = "GET /tasks/{id}/events"
FIRST_OUTPUT = "task first output"
FINAL_EVENTS = {"done": "DONE", "failed": "FAILED", "cancelled": "CANCELLED"}
MODEL = "loadtest"
# Upper bound on polls per task, on top of the deadline, so no loop can run away.
MAX_POLLS_PER_TASK = 1000
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0


def add_options(parser: LocustArgumentParser) -> None:
    # On the parser itself, not a group: only those arguments reach the web UI's form.
    parser.add_argument(
        "--unique-share",
        type=float,
        default=0.5,
        env_var="LOCUST_UNIQUE_SHARE",
        help="Share (0-1) of submissions with a prompt never sent before (cache misses)",
    )
    parser.add_argument(
        "--repeated-prompts",
        type=int,
        default=20,
        env_var="LOCUST_REPEATED_PROMPTS",
        help="How many distinct prompts the repeated submissions are drawn from",
    )
    parser.add_argument(
        "--duration-dist",
        choices=["fixed", "uniform", "exponential"],
        default="exponential",
        env_var="LOCUST_DURATION_DIST",
        help="Distribution of the simulated task duration",
    )
    parser.add_argument(
        "--duration-mean",
        type=float,
        default=0.2,
        env_var="LOCUST_DURATION_MEAN",
        help="Mean simulated task duration in seconds",
    )
    parser.add_argument(
        "--duration-max",
        type=float,
        default=2.0,
        env_var="LOCUST_DURATION_MAX",
        help="Cap on any single task duration in seconds (keep it under MAX_TASK_DURATION)",
    )
    parser.add_argument(
        "--failure-share",
        type=float,
        default=0.0,
        env_var="LOCUST_FAILURE_SHARE",
        help="Share (0-1) of submissions that ask the handler to fail",
    )
    parser.add_argument(
        "--poll-wait",
        type=float,
        default=10.0,
        env_var="LOCUST_POLL_WAIT",
        help="Long-poll window of each GET /tasks/{id}?wait= in seconds",
    )
    parser.add_argument(
        "--task-deadline",
        type=float,
        default=120.0,
        env_var="LOCUST_TASK_DEADLINE",
        help="Seconds after which an unfinished task counts as a failure",
    )
    parser.add_argument(
        "--think-min",
        type=float,
        default=0.5,
        env_var="LOCUST_THINK_MIN",
        help="Shortest pause between two tasks of one user, seconds",
    )
    parser.add_argument(
        "--think-max",
        type=float,
        default=2.0,
        env_var="LOCUST_THINK_MAX",
        help="Longest pause between two tasks of one user, seconds",
    )
    parser.add_argument(
        "--stream-share",
        type=float,
        default=0.0,
        env_var="LOCUST_STREAM_SHARE",
        help="Share of tasks followed through GET /tasks/{id}/events instead of long-polls",
    )
    parser.add_argument(
        "--api-key",
        default="",
        env_var="LOCUST_API_KEY",
        is_secret=True,
        help="API key sent as X-API-Key (leave empty when the service has no API_KEYS)",
    )


def sync_the_clock(**_: object) -> None:
    """Bring gevent's cached loop time up to now before Locust arms its --run-time timer.

    The loop reads the clock only when it runs, and it has not run yet while Locust and this
    file are imported. A timer armed later counts from that stale time, so a start that took
    longer than --run-time (a busy machine, a cold disk) ended the run before the first
    request.
    """
    gevent.get_hub().loop.update_now()


# locust's event hooks are untyped; registering through Any keeps mypy --strict quiet.
cast(Any, events.init_command_line_parser).add_listener(add_options)
cast(Any, events.init).add_listener(sync_the_clock)


class _Answer(Protocol):
    """The part of locust's catch_response context manager this file uses."""

    status_code: int
    headers: Mapping[str, str] | None

    @property
    def text(self) -> str | None: ...

    def json(self) -> Any: ...

    def success(self) -> None: ...

    def failure(self, exc: object) -> None: ...


def _retry_after(response: _Answer) -> float | None:
    """Retry-After in seconds, or None when the answer has none (or not a number)."""
    value = response.headers.get("Retry-After") if response.headers else None
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    return None


def _describe(response: _Answer) -> str:
    return f"HTTP {response.status_code}: {(response.text or '')[:200]!r}"


@dataclass(frozen=True)
class TrafficMix:
    """The options above, parsed once per task so web-UI edits apply to the next task."""

    unique_share: float
    repeated_prompts: int
    duration_dist: str
    duration_mean: float
    duration_max: float
    failure_share: float
    poll_wait: float
    task_deadline: float
    think_min: float
    think_max: float
    api_key: str
    stream_share: float

    @classmethod
    def from_environment(cls, environment: Environment) -> TrafficMix:
        options = environment.parsed_options

        def number(name: str, default: float) -> float:
            # Values edited in the web UI can arrive as strings.
            value = getattr(options, name, default) if options is not None else default
            try:
                return float(value)
            except (TypeError, ValueError):
                return default

        def text(name: str, default: str) -> str:
            value = getattr(options, name, default) if options is not None else default
            return str(value) if value is not None else default

        think_min = max(0.0, number("think_min", 0.5))
        return cls(
            unique_share=min(1.0, max(0.0, number("unique_share", 0.5))),
            repeated_prompts=max(1, int(number("repeated_prompts", 20))),
            duration_dist=text("duration_dist", "exponential"),
            duration_mean=max(0.0, number("duration_mean", 0.2)),
            duration_max=max(0.0, number("duration_max", 2.0)),
            failure_share=min(1.0, max(0.0, number("failure_share", 0.0))),
            poll_wait=max(0.0, number("poll_wait", 10.0)),
            task_deadline=max(1.0, number("task_deadline", 120.0)),
            think_min=think_min,
            think_max=max(think_min, number("think_max", 2.0)),
            api_key=text("api_key", ""),
            stream_share=min(1.0, max(0.0, number("stream_share", 0.0))),
        )

    def draw_duration(self, rng: random.Random) -> float:
        if self.duration_dist == "fixed":
            duration = self.duration_mean
        elif self.duration_dist == "uniform":
            duration = rng.uniform(0.0, 2 * self.duration_mean)
        else:
            duration = rng.expovariate(1 / self.duration_mean) if self.duration_mean > 0 else 0.0
        return round(min(duration, self.duration_max), 3)

    def draw_body(self, rng: random.Random) -> dict[str, Any]:
        if rng.random() < self.failure_share:
            return self._body(f"fail {uuid.uuid4()}", self.draw_duration(rng), fail=True)
        if rng.random() < self.unique_share:
            return self._body(f"unique {uuid.uuid4()}", self.draw_duration(rng), fail=False)
        # The pool entry fixes the duration too: the cache key covers the params as well.
        index = rng.randrange(self.repeated_prompts)
        pool_rng = random.Random(index)
        return self._body(f"repeated prompt #{index}", self.draw_duration(pool_rng), fail=False)

    @staticmethod
    def _body(prompt: str, duration: float, *, fail: bool) -> dict[str, Any]:
        params: dict[str, Any] = {"duration": duration, "model": MODEL}
        if fail:
            params["fail"] = True
        return {"prompt": prompt, "params": params}


class TaskSubmitter(FastHttpUser):
    """A client that submits one task at a time and waits for its result."""

    # Long polls hold a request open for up to --poll-wait seconds.
    network_timeout = 90.0
    connection_timeout = 10.0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.rng = random.Random()

    def wait_time(self) -> float:
        mix = TrafficMix.from_environment(self.environment)
        return self.rng.uniform(mix.think_min, mix.think_max)

    @task
    def submit_and_wait(self) -> None:
        mix = TrafficMix.from_environment(self.environment)
        body = mix.draw_body(self.rng)
        expect_failure = bool(body["params"].get("fail"))
        headers = {"X-API-Key": mix.api_key} if mix.api_key else {}
        started = time.perf_counter()

        with self.client.post(
            "/tasks", json=body, headers=headers, name=SUBMIT_NAME, catch_response=True
        ) as response:
            submitted = self._accept_submission(cast(_Answer, response))
        if submitted is None:
            return
        if submitted.get("cached") and submitted.get("status") == "DONE":
            self._report(END_TO_END_CACHED, started, None)
            return

        task_id = str(submitted["task_id"])
        if self.rng.random() < mix.stream_share:
            status, error = self._follow_events(task_id, mix, headers, started)
        else:
            status, error = self._wait_until_terminal(task_id, mix, headers, started)
        if error is None:
            wanted = "FAILED" if expect_failure else "DONE"
            if status != wanted:
                error = f"task {task_id} ended {status}, expected {wanted}"
        self._report(
            END_TO_END_COALESCED if submitted.get("coalesced") else END_TO_END, started, error
        )

    def _accept_submission(self, response: _Answer) -> dict[str, Any] | None:
        if self._shed(response):
            return None
        if response.status_code not in (200, 202):
            response.failure(_describe(response))
            self._respect_retry_after(response)
            return None
        try:
            payload = response.json()
        except ValueError:
            response.failure("response is not JSON")
            return None
        if not isinstance(payload, dict) or "task_id" not in payload:
            response.failure(f"unexpected body {payload!r:.200}")
            return None
        response.success()
        return payload

    def _wait_until_terminal(
        self, task_id: str, mix: TrafficMix, headers: dict[str, str], started: float
    ) -> tuple[str, str | None]:
        deadline = started + mix.task_deadline
        backoff = BACKOFF_START
        status = "PENDING"
        for _ in range(MAX_POLLS_PER_TASK):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return status, f"task {task_id} still {status} after {mix.task_deadline:g}s"
            wait = min(mix.poll_wait, math.floor(remaining * 10) / 10)
            asked = time.perf_counter()
            with self.client.get(
                f"/tasks/{task_id}?wait={wait:g}",
                headers=headers,
                name=POLL_NAME,
                catch_response=True,
            ) as raw:
                response = cast(_Answer, raw)
                if self._shed(response):
                    continue
                if response.status_code != 200:
                    response.failure(_describe(response))
                    return status, f"polling {task_id} got HTTP {response.status_code}"
                try:
                    status = str(response.json()["status"])
                except (ValueError, KeyError, TypeError):
                    response.failure("response has no status")
                    return status, f"polling {task_id} got a body without status"
                response.success()
            if status in TERMINAL:
                return status, None
            # A server that answers before the window ends (no long-poll) gets polled with backoff.
            if time.perf_counter() - asked < wait / 2:
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        return status, f"task {task_id} still {status} after {MAX_POLLS_PER_TASK} polls"

    def _shed(self, response: _Answer) -> bool:
        """A 429 or 503 with Retry-After: counted as shed, not failed, and waited out."""
        if response.status_code not in SHED_STATUSES or _retry_after(response) is None:
            return False
        response.success()
        self.environment.events.request.fire(
            request_type=TASK_REQUEST_TYPE,
            name=SHED,
            response_time=0,
            response_length=0,
            exception=None,
            context={},
        )
        self._respect_retry_after(response)
        return True

    def _follow_events(
        self, task_id: str, mix: TrafficMix, headers: dict[str, str], started: float
    ) -> tuple[str, str | None]:
        """Read the task's event stream to its final event; report the first output's time."""
        status = "PENDING"
        first_output = True
        deadline = started + mix.task_deadline
        with self.client.get(
            f"/tasks/{task_id}/events",
            headers=headers,
            name=EVENTS_NAME,
            stream=True,
            catch_response=True,
        ) as raw:
            response = cast(_Answer, raw)
            if response.status_code != 200:
                response.failure(_describe(response))
                return status, f"events of {task_id} got HTTP {response.status_code}"
            stream = raw.stream
            while time.perf_counter() < deadline:
                line = stream.readline(b"\n")
                if not line:
                    response.failure("the stream ended before the task did")
                    return status, f"events of {task_id} ended early"
                if not line.startswith(b"event: "):
                    continue
                kind = line[7:].strip().decode()
                if kind == "output" and first_output:
                    first_output = False
                    self._report(FIRST_OUTPUT, started, None)
                if kind in FINAL_EVENTS:
                    response.success()
                    return FINAL_EVENTS[kind], None
            response.failure("deadline")
        return status, f"task {task_id} still {status} after {mix.task_deadline:g}s"

    def _respect_retry_after(self, response: _Answer) -> None:
        retry_after = _retry_after(response)
        if retry_after is not None:
            time.sleep(min(retry_after, RETRY_AFTER_MAX))

    def _report(self, name: str, started: float, error: str | None) -> None:
        self.environment.events.request.fire(
            request_type=TASK_REQUEST_TYPE,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=RuntimeError(error) if error else None,
            context={},
        )
