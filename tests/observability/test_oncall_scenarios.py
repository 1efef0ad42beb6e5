"""Who gets paged: incidents as on-call lives them, against the rules the chart renders.

Each scenario is a history a real release could have, and its checks say which alerts page
(critical), which warn, and that every other alert stays quiet. A page must mean something is
broken for users now; a client's own limits, a stray error and the first hour after a deploy
page nobody; one incident pages at most three times, after the Alertmanager example's
inhibitions.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ._oncall import (
    ALERTMANAGER,
    NAMESPACE,
    Check,
    Counter,
    Curve,
    Gauge,
    Scenario,
    after,
    alert,
    flat,
    notified,
    run_scenario,
    series,
)

pytestmark = pytest.mark.slow

SUBMITS = 600  # a minute: 10 a second
READS = 1200
STREAM = {"stream": "task_stream", "group": "workers"}
REDIS_PODS = ("shop-fastapi-redis-mini-redis-0", "shop-fastapi-redis-mini-redis-1")
HPA = "shop-fastapi-redis-mini-worker"


def busy(
    *,
    submits: Curve | None = None,
    lag: Curve | None = None,
    waiting_age: Curve | None = None,
    in_flight: Curve | None = None,
    replicas: Curve | None = None,
) -> dict[str, Counter | Gauge]:
    """A busy healthy release: 10 submits and 20 reads a second, tasks start within a second,
    two api replicas, two workers at half their concurrency, two Redis masters each with a
    replica, three of the autoscaler's ten worker replicas."""
    submits = submits or flat(SUBMITS)
    lag = lag or flat(5)
    waiting_age = waiting_age or flat(1)
    in_flight = in_flight or flat(10)
    replicas = replicas or flat(3)
    history: dict[str, Counter | Gauge] = {}
    for pod in ("api-0", "api-1"):
        history[series("fastapi_redis_mini_redis_up", pod=pod)] = Gauge(flat(1))
        history[series("fastapi_redis_mini_stream_lag", pod=pod, **STREAM)] = Gauge(lag)
        history[
            series("fastapi_redis_mini_stream_oldest_undelivered_age_seconds", pod=pod, **STREAM)
        ] = Gauge(waiting_age)
        history[
            series("fastapi_redis_mini_stream_oldest_pending_age_seconds", pod=pod, **STREAM)
        ] = Gauge(flat(3))
        history[series("fastapi_redis_mini_dead_letter_length", pod=pod, **STREAM)] = Gauge(flat(2))
        for partition in ("0", "1"):
            history[
                series(
                    "fastapi_redis_mini_partition_stream_oldest_pending_age_seconds",
                    pod=pod,
                    partition=partition,
                    **STREAM,
                )
            ] = Gauge(flat(3))
    post = {"pod": "api-0", "method": "POST", "route": "/tasks"}
    history[series("fastapi_redis_mini_http_requests_total", status="202", **post)] = Counter(
        submits
    )
    history[series("fastapi_redis_mini_tasks_submitted_total", pod="api-0", outcome="queued")] = (
        Counter(submits)
    )
    for le in ("0.25", "+Inf"):
        history[
            series(
                "fastapi_redis_mini_http_request_duration_seconds_bucket",
                status="202",
                le=le,
                **post,
            )
        ] = Counter(submits)
    history[
        series("fastapi_redis_mini_http_request_duration_seconds_count", status="202", **post)
    ] = Counter(submits)
    history[
        series(
            "fastapi_redis_mini_http_requests_total",
            pod="api-0",
            method="GET",
            route="/tasks/{task_id}",
            status="200",
        )
    ] = Counter(flat(READS))
    for pod in ("worker-0", "worker-1"):
        history[series("fastapi_redis_mini_tasks_finished_total", pod=pod, status="DONE")] = (
            Counter(lambda t: (submits(t) or 0) / 2)
        )
        history[series("fastapi_redis_mini_tasks_in_flight", pod=pod)] = Gauge(
            lambda t: (in_flight(t) or 0) / 2
        )
        history[series("fastapi_redis_mini_worker_concurrency_limit", pod=pod)] = Gauge(flat(10))
        history[series("fastapi_redis_mini_tasks_dead_lettered_total", pod=pod)] = Counter(flat(0))
        for le in ("30.0", "+Inf"):
            history[series("fastapi_redis_mini_task_queue_wait_seconds_bucket", pod=pod, le=le)] = (
                Counter(lambda t: (submits(t) or 0) / 2)
            )
        history[series("fastapi_redis_mini_task_queue_wait_seconds_count", pod=pod)] = Counter(
            lambda t: (submits(t) or 0) / 2
        )
    for pod in REDIS_PODS:
        history[series("redis_instance_info", pod=pod, role="master")] = Gauge(flat(1))
        history[series("redis_connected_slaves", pod=pod)] = Gauge(flat(1))
        history[series("redis_evicted_keys_total", pod=pod)] = Counter(flat(0))
        history[series("redis_cluster_state", pod=pod)] = Gauge(flat(1))
    history[
        f'kube_horizontalpodautoscaler_status_current_replicas{{namespace="{NAMESPACE}", '
        f'horizontalpodautoscaler="{HPA}"}}'
    ] = Gauge(replicas)
    history[
        f'kube_horizontalpodautoscaler_spec_max_replicas{{namespace="{NAMESPACE}", '
        f'horizontalpodautoscaler="{HPA}"}}'
    ] = Gauge(flat(10))
    return history


CLUSTER = {"redis": {"mode": "cluster"}}


def quiet(*times: str) -> tuple[Check, ...]:
    return tuple(Check(at) for at in times)


SCENARIOS = [
    Scenario(
        "a busy healthy system with a trickle of errors pages nobody, for seven hours",
        420,
        {
            **busy(),
            # One failed Redis call a minute (1 in 50,000), 0.05% of submits 5xx (half the
            # budget), one task a minute failing (0.17%).
            series(
                "fastapi_redis_mini_redis_errors_total", pod="worker-0", operation="read"
            ): Counter(flat(1)),
            series(
                "fastapi_redis_mini_http_requests_total",
                pod="api-0",
                method="POST",
                route="/tasks",
                status="503",
            ): Counter(flat(0.3)),
            series(
                "fastapi_redis_mini_tasks_finished_total", pod="worker-0", status="FAILED"
            ): Counter(flat(1)),
        },
        quiet("30m", "2h", "5h30m", "7h"),
        CLUSTER,
    ),
    Scenario(
        "a fresh deploy pages nobody: clients submit before the workers are up, and a 2% "
        "blip of 5xx hits in the first ten minutes",
        90,
        {
            **busy(
                # The workers start at minute 4: the backlog rises, then drains at twice the
                # arrival rate.
                lag=lambda t: min(t, 4) * 600 - max(0, t - 4) * 1200 if t < 6 else 5,
                waiting_age=lambda t: 60 * t if t < 5 else 1,
            ),
            # Every task queued before minute 4 waited longer than the objective's 30 s.
            **{
                series(
                    "fastapi_redis_mini_task_queue_wait_seconds_bucket", pod=pod, le="30.0"
                ): Counter(lambda t: None if t < 4 else (0 if t < 6 else 300))
                for pod in ("worker-0", "worker-1")
            },
            **{
                series(
                    "fastapi_redis_mini_task_queue_wait_seconds_bucket", pod=pod, le="+Inf"
                ): Counter(lambda t: None if t < 4 else (600 if t < 6 else 300))
                for pod in ("worker-0", "worker-1")
            },
            **{
                series("fastapi_redis_mini_task_queue_wait_seconds_count", pod=pod): Counter(
                    lambda t: None if t < 4 else (600 if t < 6 else 300)
                )
                for pod in ("worker-0", "worker-1")
            },
            **{
                series("fastapi_redis_mini_tasks_finished_total", pod=pod, status="DONE"): Counter(
                    lambda t: None if t < 4 else 300
                )
                for pod in ("worker-0", "worker-1")
            },
            series(
                "fastapi_redis_mini_http_requests_total",
                pod="api-0",
                method="POST",
                route="/tasks",
                status="500",
            ): Counter(after(10, 12, 0)),
        },
        quiet("8m", "12m", "30m", "55m", "80m"),
    ),
    Scenario(
        "a client over its quota pages nobody, nor 1% of quota refusals all day",
        420,
        {
            **busy(),
            # 429 for rate_limited and too_many_unfinished: 1% all day, and one tenant
            # hammering at half of all submits between hours 2 and 3.
            series(
                "fastapi_redis_mini_http_requests_total",
                pod="api-0",
                method="POST",
                route="/tasks",
                status="429",
            ): Counter(lambda t: 600.0 if 120 <= t < 180 else 6.0),
        },
        quiet("2h10m", "2h30m", "3h", "7h"),
    ),
    Scenario(
        "a replica lost, and a replica cut off from its master, warn",
        40,
        {
            **busy(),
            series("redis_connected_slaves", pod=REDIS_PODS[0]): Gauge(after(10, 1, 0)),
            series("redis_connected_slaves", pod=REDIS_PODS[1]): Gauge(after(10, 1, 0)),
            series(
                "redis_instance_info", pod="shop-fastapi-redis-mini-redis-3", role="slave"
            ): Gauge(flat(1)),
            series("redis_master_link_up", pod="shop-fastapi-redis-mini-redis-3"): Gauge(
                after(10, 1, 0)
            ),
        },
        (
            Check("12m"),
            Check(
                "20m",
                warnings=(
                    alert("RedisReplicaMissing", pod=REDIS_PODS[0]),
                    alert("RedisReplicaMissing", pod=REDIS_PODS[1]),
                    alert("RedisReplicaMissing", pod="shop-fastapi-redis-mini-redis-3"),
                ),
            ),
        ),
        CLUSTER,
    ),
    Scenario(
        "a cluster node that sees slots without a master warns; the api still reads, so no page",
        30,
        {**busy(), series("redis_cluster_state", pod=REDIS_PODS[1]): Gauge(after(10, 1, 0))},
        (
            Check("10m"),
            Check("15m", warnings=(alert("RedisClusterStateNotOk", pod=REDIS_PODS[1]),)),
        ),
        CLUSTER,
    ),
    Scenario(
        "an entry stuck pending in one partition pages after an hour",
        80,
        {
            **busy(),
            **{
                series(
                    "fastapi_redis_mini_partition_stream_oldest_pending_age_seconds",
                    pod=pod,
                    partition="1",
                    **STREAM,
                ): Gauge(lambda t: 60.0 * t)
                for pod in ("api-0", "api-1")
            },
            **{
                series(
                    "fastapi_redis_mini_stream_oldest_pending_age_seconds", pod=pod, **STREAM
                ): Gauge(lambda t: 60.0 * t)
                for pod in ("api-0", "api-1")
            },
        },
        (
            Check("55m"),
            Check("70m", pages=(alert("PendingTaskStuck", partition="1", **STREAM),)),
        ),
    ),
    Scenario(
        "a backlog that grows forever warns, however fast the workers finish",
        90,
        {**busy(lag=lambda t: 5 if t < 10 else 5 + 3 * (t - 10))},
        # Ten minutes of growth before the alert's own 10 minutes.
        (Check("15m"), Check("30m", warnings=(alert("BacklogNotDraining", **STREAM),))),
    ),
    Scenario(
        "one dead letter every 20 minutes warns without flapping",
        90,
        {
            **busy(),
            series("fastapi_redis_mini_tasks_dead_lettered_total", pod="worker-0"): Counter(
                lambda t: 1.0 if t % 20 == 10 else 0.0
            ),
        },
        (
            Check("9m"),
            *(
                Check(at, warnings=(alert("DeadLettersArriving"),))
                for at in ("11m", "24m", "27m", "35m", "47m", "52m", "66m", "80m")
            ),
        ),
    ),
    Scenario(
        "2% of reads failing for an hour pages on the read objective, long-polls included",
        140,
        {
            **busy(),
            series(
                "fastapi_redis_mini_http_requests_total",
                pod="api-0",
                method="GET",
                route="/tasks/{task_id}",
                status="500",
            ): Counter(after(70, 0, 12)),
            series(
                "fastapi_redis_mini_http_requests_total",
                pod="api-0",
                method="GET",
                route="/tasks/{task_id}?wait",
                status="500",
            ): Counter(after(70, 0, 12)),
        },
        (
            Check("80m"),
            Check("135m", pages=(alert("ErrorBudgetBurnFast", slo="read_availability"),)),
        ),
    ),
    Scenario(
        "one submit in five slower than 250 ms pages on the latency objective",
        140,
        {
            **busy(),
            series(
                "fastapi_redis_mini_http_request_duration_seconds_bucket",
                pod="api-0",
                method="POST",
                route="/tasks",
                status="202",
                le="0.25",
            ): Counter(after(70, SUBMITS, SUBMITS * 0.8)),
        },
        (
            Check("80m"),
            Check("135m", pages=(alert("ErrorBudgetBurnFast", slo="api_latency"),)),
        ),
    ),
    Scenario(
        "Redis evicting keys pages at once",
        30,
        {
            **busy(),
            series("redis_evicted_keys_total", pod=REDIS_PODS[0]): Counter(after(15, 0, 50)),
        },
        (Check("14m"), Check("17m", pages=(alert("RedisEvictingKeys", pod=REDIS_PODS[0]),))),
    ),
]

# The six-alert incident: after a healthy hour the backlog fills to MAX_BACKLOG, 90% of
# submits are refused, the workers crawl at their concurrency with the autoscaler at its
# maximum, and tasks wait for half an hour.
FULL = 60
BACKLOG_FULL = Scenario(
    "a backlog pinned at its limit pages twice, on its two objectives; the causes warn",
    130,
    {
        **busy(
            submits=after(FULL, SUBMITS, 60),
            lag=lambda t: 5 if t < FULL else min(10_000, 500 * (t - FULL)),
            waiting_age=lambda t: 1 if t < FULL else 60.0 * (t - FULL),
            in_flight=after(FULL, 10, 20),
            replicas=after(FULL, 3, 10),
        ),
        series(
            "fastapi_redis_mini_tasks_submitted_total", pod="api-0", outcome="rejected"
        ): Counter(after(FULL, 0, 540)),
        series(
            "fastapi_redis_mini_http_requests_total",
            pod="api-0",
            method="POST",
            route="/tasks",
            status="429",
        ): Counter(after(FULL, 0, 540)),
        **{
            series(
                "fastapi_redis_mini_task_queue_wait_seconds_bucket", pod=pod, le="30.0"
            ): Counter(after(FULL, SUBMITS / 2, 0))
            for pod in ("worker-0", "worker-1")
        },
    },
    (
        Check("55m"),
        Check(
            "120m",
            pages=(
                alert("ErrorBudgetBurnFast", slo="submit_availability"),
                alert("ErrorBudgetBurnFast", slo="queue_wait"),
            ),
            warnings=(
                alert("SubmitsRejected"),
                alert("BacklogNearLimit", **STREAM),
                alert("BacklogNotDraining", **STREAM),
                alert("OldestTaskWaitingTooLong", **STREAM),
                alert("WorkersSaturated"),
                alert("WorkerAutoscalerAtMax", horizontalpodautoscaler=HPA),
            ),
        ),
    ),
)

# Redis down for five minutes, after five healthy hours (so every window is full): the api
# answers 503 and cannot read the queue, the workers finish nothing and count errors.
DOWN, UP = 330, 335


def _outage(value: float) -> Curve:
    return lambda t: 0.0 if DOWN <= t < UP else value


REDIS_OUTAGE = Scenario(
    "a five-minute Redis outage pages once while it lasts, and nothing after it",
    420,
    {
        **busy(submits=_outage(SUBMITS)),
        **{
            series("fastapi_redis_mini_redis_up", pod=pod): Gauge(
                lambda t: 0 if DOWN <= t < UP else 1
            )
            for pod in ("api-0", "api-1")
        },
        **{
            series("fastapi_redis_mini_stream_lag", pod=pod, **STREAM): Gauge(
                lambda t: None if DOWN <= t < UP else 5
            )
            for pod in ("api-0", "api-1")
        },
        series(
            "fastapi_redis_mini_http_requests_total",
            pod="api-0",
            method="POST",
            route="/tasks",
            status="503",
        ): Counter(lambda t: SUBMITS - (_outage(SUBMITS)(t) or 0)),
        series(
            "fastapi_redis_mini_http_requests_total",
            pod="api-0",
            method="GET",
            route="/tasks/{task_id}",
            status="200",
        ): Counter(_outage(READS)),
        series(
            "fastapi_redis_mini_http_requests_total",
            pod="api-0",
            method="GET",
            route="/tasks/{task_id}",
            status="503",
        ): Counter(lambda t: READS - (_outage(READS)(t) or 0)),
        series("fastapi_redis_mini_redis_errors_total", pod="worker-0", operation="read"): Counter(
            lambda t: 100 - (_outage(100)(t) or 0)
        ),
    },
    (
        Check("329m"),
        Check(
            "334m",
            pages=(
                alert("RedisUnavailable"),
                alert("ErrorBudgetBurnFast", slo="submit_availability"),
                alert("ErrorBudgetBurnFast", slo="read_availability"),
            ),
        ),
        # keep_firing_for holds the Redis page, and its inhibition, while the 5-minute
        # windows of the SLO alerts clear.
        Check(
            "338m",
            pages=(
                alert("RedisUnavailable"),
                alert("ErrorBudgetBurnFast", slo="submit_availability"),
                alert("ErrorBudgetBurnFast", slo="read_availability"),
            ),
        ),
        *quiet("345m", "360m", "6h30m", "7h"),
    ),
)

ALL = [*SCENARIOS, BACKLOG_FULL, REDIS_OUTAGE]


@pytest.mark.parametrize("scenario", ALL, ids=[s.name for s in ALL])
def test_on_call_is_told_exactly_this(promtool: str, scenario: Scenario, tmp_path: Path) -> None:
    run_scenario(promtool, scenario, tmp_path)


@pytest.mark.parametrize("scenario", ALL, ids=[s.name for s in ALL])
def test_an_incident_pages_at_most_three_times_after_inhibition(scenario: Scenario) -> None:
    for check in scenario.checks:
        pages = [a for a in notified(check) if a["severity"] == "critical"]
        assert len(pages) <= 3, (check.at, pages)


def test_redis_down_is_one_page_and_the_fast_burn_stands_in_for_the_slow() -> None:
    (during,) = [c for c in REDIS_OUTAGE.checks if c.at == "334m"]
    assert [a["alertname"] for a in notified(during)] == ["FastapiRedisMiniRedisUnavailable"]
    both = Check(
        "0m",
        pages=(
            alert("ErrorBudgetBurnFast", slo="queue_wait"),
            alert("ErrorBudgetBurnSlow", slo="queue_wait"),
            alert("ErrorBudgetBurnSlow", slo="task_success"),
        ),
    )
    assert [(a["alertname"], a["slo"]) for a in notified(both)] == [
        ("FastapiRedisMiniErrorBudgetBurnFast", "queue_wait"),
        ("FastapiRedisMiniErrorBudgetBurnSlow", "task_success"),
    ]


def test_every_new_alert_is_seen_firing_in_a_scenario() -> None:
    seen = {a.name for s in ALL for c in s.checks for a in (*c.pages, *c.warnings)}
    wanted = {
        "RedisReplicaMissing",
        "RedisClusterStateNotOk",
        "PendingTaskStuck",
        "WorkersSaturated",
        "WorkerAutoscalerAtMax",
        "RedisEvictingKeys",
    }
    assert wanted <= seen, sorted(wanted - seen)


def test_the_alertmanager_example_is_a_valid_config(amtool: str) -> None:
    result = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
