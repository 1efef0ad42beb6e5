"""Generate the overview Grafana dashboard from typed code.

The committed JSON (``charts/fastapi-redis-mini/files/grafana/overview.json``) is what
Grafana loads, by hand import or through the chart's ConfigMap; this script is the only
way it should change::

    python tools/grafana_dashboard.py            # rewrite the committed file
    python tools/grafana_dashboard.py --check    # exit 1 if the committed file is stale

Every query selects ``namespace="$namespace", release="$release"``. The chart's scrape
config copies the pods' ``app.kubernetes.io/instance`` label into ``release`` and keeps
the ``namespace`` and ``pod`` target labels (see docs/observability.md). Queue gauges
are exported identically by every api replica, so they are aggregated with ``max``;
counters and histograms are per process and are summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

OUTPUT = (
    Path(__file__).resolve().parent.parent
    / "charts"
    / "fastapi-redis-mini"
    / "files"
    / "grafana"
    / "overview.json"
)

UID = "fastapi-redis-mini-overview"
PREFIX = "fastapi_redis_mini_"
SELECTOR = 'namespace="$namespace", release="$release"'
RATE_WINDOW = "$__rate_interval"
# Kubelet probes and Prometheus scrapes are frequent and trivially fast; left in, they
# would hide what clients see in the latency percentiles and the error ratio.
CLIENT_ROUTES = 'route!~"/metrics|/healthz|/readyz"'
# The chart names the worker Deployment and its HPA "<fullname>-worker", and Helm's
# usual fullname is the release name, or "<release>-fastapi-redis-mini" when the release
# name does not already contain the chart name. KEDA names the HPA it creates
# "keda-hpa-<ScaledObject name>".
WORKER_DEPLOYMENT = '"$release(-fastapi-redis-mini)?-worker"'
WORKER_HPA = '"(keda-hpa-)?$release(-fastapi-redis-mini)?-worker"'
QUANTILES = (0.5, 0.95, 0.99)
# Only a worker sets a concurrency limit; any other target exposing the gauge reports 0.
WORKER_TARGETS = f"{PREFIX}worker_concurrency_limit{{{SELECTOR}}} > 0"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel and its legend."""

    expr: str
    legend: str


def metric(name: str, *matchers: str) -> str:
    """A selector for one of the service's series, scoped to the chosen namespace and release."""
    return f"{PREFIX}{name}{{{', '.join((SELECTOR, *matchers))}}}"


def rate(name: str, *matchers: str) -> str:
    return f"rate({metric(name, *matchers)}[{RATE_WINDOW}])"


def quantiles(histogram: str, *matchers: str) -> list[Query]:
    buckets = f"sum by (le) ({rate(f'{histogram}_bucket', *matchers)})"
    return [Query(f"histogram_quantile({q}, {buckets})", f"p{round(q * 100)}") for q in QUANTILES]


def queue_gauge(name: str) -> str:
    # Every api replica reads the same stream, so summing would multiply by replicas.
    return f"max by (namespace, stream, group) ({metric(name)})"


def lane_gauge(name: str, *matchers: str) -> str:
    return f"max by (namespace, priority) ({metric(name, *matchers)})"


def partition_gauge(name: str) -> str:
    return f"max by (namespace, partition) ({metric(name)})"


def _targets(queries: Sequence[Query]) -> list[prometheus.Dataquery]:
    return [
        prometheus.Dataquery()
        .expr(query.expr)
        .legend_format(query.legend)
        .ref_id(chr(ord("A") + index))
        .datasource(DATASOURCE)
        for index, query in enumerate(queries)
    ]


def graph(
    title: str, description: str, unit: str, queries: Sequence[Query], width: int = 8
) -> timeseries.Panel:
    """A time-series panel; the legend lists the last and maximum value of each series."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(8)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
    )
    for target in _targets(queries):
        panel.with_target(target)
    return panel


def single_stat(
    title: str, description: str, unit: str, queries: Sequence[Query], warn_above: float
) -> stat.Panel:
    """A big-number panel that turns red once the value reaches ``warn_above``."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(4)
        .height(8)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(
            dashboard.ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    model.Threshold(value=None, color="green"),
                    model.Threshold(value=warn_above, color="red"),
                ]
            )
        )
    )
    for target in _targets(queries):
        panel.with_target(target)
    return panel


def variables() -> list[dashboard.DatasourceVariable | dashboard.QueryVariable]:
    # One series every api scrape exports, so the lookup never scans every metric name.
    anchor = f"{PREFIX}redis_up"
    namespace = (
        dashboard.QueryVariable("namespace")
        .id("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query(f"label_values({anchor}, namespace)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    release = (
        dashboard.QueryVariable("release")
        .id("release")
        .label("Release")
        .datasource(DATASOURCE)
        .query(f'label_values({anchor}{{namespace="$namespace"}}, release)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    datasource = (
        dashboard.DatasourceVariable("datasource")
        .id("datasource")
        .label("Data source")
        .type("prometheus")
    )
    return [datasource, namespace, release]


def api_row() -> list[Builder[model.Panel]]:
    requests = "http_requests_total"

    def ratio(status: str) -> str:
        # No 5xx series at all is a ratio of 0, not "No data".
        status_matcher = f'status=~"{status}"'
        answered = f"sum({rate(requests, CLIENT_ROUTES, status_matcher)})"
        return f"({answered} or vector(0)) / sum({rate(requests, CLIENT_ROUTES)})"

    return [
        graph(
            "Request rate by route",
            "Requests per second, summed over api replicas and their gunicorn workers.",
            "reqps",
            [Query(f"sum by (route) ({rate(requests)})", "{{route}}")],
        ),
        graph(
            "Error ratio",
            "Share of client requests (probes and scrapes excluded) answered with 5xx, "
            "and with 4xx (validation, auth, 429 backlog full).",
            "percentunit",
            [
                Query(ratio("5.."), "5xx"),
                Query(ratio("4.."), "4xx"),
            ],
        ),
        graph(
            "Submit latency",
            "POST /tasks duration percentiles, the latency clients wait to have a task queued.",
            "s",
            quantiles("http_request_duration_seconds", 'method="POST"', 'route="/tasks"'),
        ),
        graph(
            "p99 latency by route",
            "Each route and method apart, probes and scrapes excluded. Long-polls are the "
            "route /tasks/{task_id}?wait: they take their wait (up to 30 s) on purpose.",
            "s",
            [
                Query(
                    "histogram_quantile(0.99, sum by (le, method, route) "
                    f"({rate('http_request_duration_seconds_bucket', CLIENT_ROUTES)}))",
                    "{{method}} {{route}}",
                )
            ],
        ),
    ]


def tasks_row() -> list[Builder[model.Panel]]:
    hits = f"""sum({rate("tasks_submitted_total", 'outcome="cached"')})"""
    misses = f"""sum({rate("tasks_submitted_total", 'outcome="queued"')})"""
    return [
        graph(
            "Tasks submitted by outcome",
            "queued: sent to the stream; cached: answered from the result cache; "
            "duplicate: an Idempotency-Key repeat; idempotency_key_reused: a key sent "
            "again with another body, refused; rejected: refused (backlog full); "
            "rate_limited, too_many_unfinished: refused by an API key's quota.",
            "ops",
            [
                Query(f"sum by (outcome) ({rate('tasks_submitted_total')})", "{{outcome}}"),
                Query(f"sum({rate('tasks_submitted_total')})", "all"),
            ],
        ),
        graph(
            "Tasks finished by status",
            "Tasks the workers finished per second, by final status.",
            "ops",
            [Query(f"sum by (status) ({rate('tasks_finished_total')})", "{{status}}")],
        ),
        graph(
            "Cache hit ratio",
            "Share of cached among cached and queued submissions.",
            "percentunit",
            [Query(f"{hits} / ({hits} + {misses})", "hit ratio")],
        ),
    ]


def queue_row() -> list[Builder[model.Panel]]:
    return [
        graph(
            "Stream backlog",
            "length: entries in the stream; lag: entries the consumer group has not read "
            "yet; pending: read by a worker but not acknowledged. Every api replica reports "
            "the same values, so they are combined with max, never sum.",
            "short",
            [
                Query(queue_gauge("stream_length"), "length {{stream}}"),
                Query(queue_gauge("stream_lag"), "lag {{stream}}/{{group}}"),
                Query(queue_gauge("stream_pending"), "pending {{stream}}/{{group}}"),
            ],
            width=16,
        ),
        single_stat(
            "Waiting tasks",
            "Consumer-group lag plus the tasks waiting in the priority lanes: tasks no "
            "worker has picked up yet.",
            "short",
            [
                Query(
                    f"sum({queue_gauge('stream_lag')}) + sum({lane_gauge('lane_depth')})",
                    "waiting",
                )
            ],
            warn_above=1000,
        ),
        single_stat(
            "Dead-letter size",
            "Tasks that exhausted their deliveries. Inspect and replay them with "
            "`python -m fastapi_redis_mini.admin dead-letter list|replay`.",
            "short",
            [Query(f"sum({queue_gauge('dead_letter_length')})", "dead letter")],
            warn_above=1,
        ),
        graph(
            "Oldest task ages",
            "waiting: the oldest entry no worker has been handed yet; pending: the oldest "
            "entry handed out and not acknowledged. Both are 0 when there is none.",
            "s",
            [
                Query(queue_gauge("stream_oldest_undelivered_age_seconds"), "waiting"),
                Query(queue_gauge("stream_oldest_pending_age_seconds"), "pending"),
            ],
            width=12,
        ),
        graph(
            "Retries waiting, consumers, Redis reachable",
            "Tasks waiting out a retry backoff; consumers in the group; 1 while every api "
            "replica reads the queue from Redis.",
            "short",
            [
                Query(queue_gauge("retry_set_size"), "retries waiting"),
                Query(queue_gauge("stream_consumers"), "consumers"),
                Query(f"min({metric('redis_up')})", "redis up"),
            ],
            width=12,
        ),
        *(
            graph(
                f"Lane {priority}",
                f"With PRIORITY_LANES: the tasks waiting in the {priority} lane, and how long "
                "the next one to leave it has waited (0 when empty). Workers prefer higher "
                "lanes; every PRIORITY_STARVATION_GUARD-th task comes from a lower one.",
                "short",
                [
                    Query(lane_gauge("lane_depth", f'priority="{priority}"'), "waiting"),
                    Query(
                        lane_gauge("lane_oldest_age_seconds", f'priority="{priority}"'),
                        "next one's wait (s)",
                    ),
                ],
            )
            for priority in ("high", "normal", "low")
        ),
        graph(
            "Backlog per partition",
            "With QUEUE_PARTITIONS above 1: lag and pending of each partition's stream. One "
            "partition far above the others is a hot key or a stuck consumer.",
            "short",
            [
                Query(partition_gauge("partition_stream_lag"), "lag {{partition}}"),
                Query(partition_gauge("partition_stream_pending"), "pending {{partition}}"),
            ],
            width=12,
        ),
        graph(
            "Oldest pending age per partition",
            "The oldest entry handed out and not acknowledged, per partition: past an hour "
            "FastapiRedisMiniPendingTaskStuck pages.",
            "s",
            [
                Query(
                    partition_gauge("partition_stream_oldest_pending_age_seconds"),
                    "{{partition}}",
                )
            ],
            width=12,
        ),
    ]


def slo_row() -> list[Builder[model.Panel]]:
    ratio = f"fastapi_redis_mini:slo_error_ratio:rate1h{{{SELECTOR}}}"
    objective = f"fastapi_redis_mini:slo_objective{{{SELECTOR}}}"
    return [
        graph(
            "Error ratio by objective (1 h)",
            "Share of bad events over the last hour: submit_availability (POST /tasks 5xx "
            "or 429), queue_wait (tasks that started later than the threshold), task_success "
            "(FAILED among DONE and FAILED).",
            "percentunit",
            [Query(f"max by (slo) ({ratio})", "{{slo}}")],
            width=8,
        ),
        graph(
            "Error budget remaining (30 d)",
            "Share of each objective's 30-day error budget not yet spent: 1 minus the mean "
            "hourly error ratio over 30 days (each hour weighs the same, however busy) over "
            "the budget. Below 0 the objective is missed.",
            "percentunit",
            [
                Query(
                    f"max by (slo) (1 - avg_over_time({ratio}[30d]) "
                    f"/ on (namespace, release, slo) (1 - {objective}))",
                    "{{slo}}",
                )
            ],
            width=8,
        ),
        graph(
            "Error budget burn rate (1 h)",
            "The hourly error ratio over the objective's budget: 1 spends the budget in "
            "exactly 30 days; 14.4 pages (with the 5-minute window), 6 pages over 6 hours.",
            "short",
            [
                Query(
                    f"max by (slo) ({ratio} / on (namespace, release, slo) (1 - {objective}))",
                    "{{slo}}",
                )
            ],
            width=8,
        ),
    ]


def redis_row() -> list[Builder[model.Panel]]:
    """From the redis_exporter sidecar (redis.metrics.enabled)."""
    exporter = f"{{{SELECTOR}}}"
    limit = (
        'max by (pod) (kube_pod_container_resource_limits{namespace="$namespace", '
        'container="redis", resource="memory"} '
        f"and on (namespace, pod) redis_memory_used_bytes{exporter})"
    )
    return [
        graph(
            "Redis memory",
            "used and RSS against maxmemory (writes are refused beyond it) and the "
            "container's memory limit (the kernel kills Redis beyond it).",
            "bytes",
            [
                Query(f"max by (pod) (redis_memory_used_bytes{exporter})", "used {{pod}}"),
                Query(f"max by (pod) (redis_memory_used_rss_bytes{exporter})", "rss {{pod}}"),
                Query(f"max by (pod) (redis_memory_max_bytes{exporter})", "maxmemory {{pod}}"),
                Query(limit, "limit {{pod}}"),
            ],
        ),
        graph(
            "Redis clients",
            "Connected clients, and connections refused at maxclients.",
            "short",
            [
                Query(f"max by (pod) (redis_connected_clients{exporter})", "connected {{pod}}"),
                Query(
                    f"max by (pod) (rate(redis_rejected_connections_total{exporter}"
                    f"[{RATE_WINDOW}]))",
                    "rejected/s {{pod}}",
                ),
            ],
        ),
        graph(
            "Redis up, replicas and evictions",
            "up: the exporter reached Redis (1); replicas: connected to each master (fewer "
            "than redis.cluster.replicasPerMaster: a replica is lost); evicted/s: keys Redis "
            "deleted to make room, each one a task, result or stream lost.",
            "short",
            [
                Query(f"min by (pod) (redis_up{exporter})", "up {{pod}}"),
                Query(f"max by (pod) (redis_connected_slaves{exporter})", "replicas {{pod}}"),
                Query(
                    f"max by (pod) (rate(redis_evicted_keys_total{exporter}[{RATE_WINDOW}]))",
                    "evicted/s {{pod}}",
                ),
            ],
        ),
        graph(
            "Redis Cluster state and slots",
            "Cluster mode only. state: 1 while the node reports cluster_state:ok, 0 once it "
            "has slots without a reachable master (writes and reads to those slots fail); "
            "slots failing: slots whose master is marked failed (fail) or suspected (pfail) "
            "by this node. Both stay flat in standalone mode.",
            "short",
            [
                Query(f"min by (pod) (redis_cluster_state{exporter})", "state {{pod}}"),
                Query(
                    f"max by (pod) (redis_cluster_slots_fail{exporter} "
                    f"+ redis_cluster_slots_pfail{exporter})",
                    "slots failing {{pod}}",
                ),
                Query(f"min by (pod) (redis_cluster_known_nodes{exporter})", "known nodes {{pod}}"),
            ],
        ),
        graph(
            "Redis keys and persistence",
            "Keys per database (tasks, cached results, idempotency keys); the last "
            "append-only-file write: 1 ok, 0 failed (Redis then refuses writes).",
            "short",
            [
                Query(f"max by (pod, db) (redis_db_keys{exporter})", "keys {{db}}"),
                Query(f"min by (pod) (redis_aof_last_write_status{exporter})", "AOF write ok"),
            ],
        ),
    ]


def latency_row() -> list[Builder[model.Panel]]:
    return [
        graph(
            "Queue wait",
            "Time from submission to a worker starting the task.",
            "s",
            quantiles("task_queue_wait_seconds"),
        ),
        graph(
            "Run time",
            "Time from a worker starting the task to its final status.",
            "s",
            quantiles("task_run_seconds"),
        ),
        graph(
            "End to end",
            "Time from submission to the final status.",
            "s",
            quantiles("task_end_to_end_seconds"),
        ),
    ]


def workers_row() -> list[Builder[model.Panel]]:
    in_flight = (
        f"sum by (pod) ({metric('tasks_in_flight')} and on (namespace, pod) {WORKER_TARGETS})"
    )
    return [
        graph(
            "In-flight tasks per worker",
            "Tasks each worker pod is running, against its concurrency limit.",
            "short",
            [
                Query(in_flight, "{{pod}}"),
                Query(f"max({metric('worker_concurrency_limit')})", "limit per worker"),
            ],
        ),
        graph(
            "Redeliveries and dead letters",
            "reclaimed: taken over from a consumer that stopped; retried: run again after "
            "a failure; dead-lettered: given up on.",
            "ops",
            [
                Query(f"sum({rate('tasks_reclaimed_total')})", "reclaimed"),
                Query(f"sum({rate('tasks_retried_total')})", "retried"),
                Query(f"sum({rate('tasks_dead_lettered_total')})", "dead-lettered"),
            ],
        ),
        graph(
            "Partitions taking outcomes",
            "taking: partitions whose master takes every worker's outcomes now; partitions: "
            "all of them. A partition below that refuses outcomes (its master unreachable, "
            "its slots down, or no replica to confirm with DURABLE_ACKS=replica): its tasks "
            "wait, the other partitions' go on. Standalone Redis is one partition.",
            "short",
            [
                Query(f"sum(min by (partition) ({metric('partition_writable')}))", "taking"),
                Query(f"count(min by (partition) ({metric('partition_writable')}))", "partitions"),
            ],
        ),
        graph(
            "Redis errors",
            "Failed Redis calls per second, by operation: api (a request), metrics (the "
            "api's queue reading at scrape time) and the workers' read, start, finish, "
            "keep_alive, maintenance and ensure_group.",
            "ops",
            [Query(f"sum by (operation) ({rate('redis_errors_total')})", "{{operation}}")],
        ),
        graph(
            "Webhook deliveries waiting",
            "waiting: deliveries not settled yet (due, backing off between attempts, or "
            "being attempted); dead-lettered: those that failed WEBHOOK_MAX_ATTEMPTS times or "
            "were refused by the guard. List them with `python -m fastapi_redis_mini.admin "
            "webhooks dead-letter`.",
            "short",
            [
                Query(queue_gauge("webhook_deliveries_pending"), "waiting"),
                Query(queue_gauge("webhook_dead_letter_length"), "dead-lettered"),
            ],
        ),
    ]


def scaling_row() -> list[Builder[model.Panel]]:
    deployment = f'namespace="$namespace", deployment=~{WORKER_DEPLOYMENT}'
    hpa = f'namespace="$namespace", horizontalpodautoscaler=~{WORKER_HPA}'
    return [
        graph(
            "Worker replicas and autoscaler",
            "From kube-state-metrics. Available replicas are the ones serving; desired above "
            "current means the autoscaler is still scaling out; desired at max means it "
            "cannot scale further.",
            "short",
            [
                Query(
                    f"sum(kube_deployment_status_replicas_available{{{deployment}}})",
                    "replicas available",
                ),
                Query(
                    f"sum(kube_horizontalpodautoscaler_status_current_replicas{{{hpa}}})",
                    "HPA current",
                ),
                Query(
                    f"sum(kube_horizontalpodautoscaler_status_desired_replicas{{{hpa}}})",
                    "HPA desired",
                ),
                Query(f"sum(kube_horizontalpodautoscaler_spec_max_replicas{{{hpa}}})", "HPA max"),
            ],
            width=16,
        ),
        graph(
            "Workers reporting",
            "Worker processes Prometheus scrapes, whatever runs them.",
            "short",
            [Query(f"count({WORKER_TARGETS})", "workers")],
        ),
    ]


ROWS = (
    ("Api: traffic, errors, latency", api_row),
    ("Tasks: throughput and cache", tasks_row),
    ("Queue: is work piling up?", queue_row),
    ("Objectives: is the error budget burning?", slo_row),
    ("Task latency: waiting and running", latency_row),
    ("Workers", workers_row),
    ("Scaling: is the autoscaler keeping up?", scaling_row),
    ("Redis: memory, clients, replication, persistence", redis_row),
)


def build() -> model.Dashboard:
    """The overview dashboard, panels numbered in reading order."""
    board = (
        dashboard.Dashboard("fastapi-redis-mini / overview")
        .uid(UID)
        .description("Api traffic, task throughput, queue backlog, task latency and scaling.")
        .tags(["fastapi-redis-mini"])
        .editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
    )
    for variable in variables():
        board.with_variable(variable)
    for title, row_panels in ROWS:
        board.with_row(dashboard.Row(title))
        for panel in row_panels():
            board.with_panel(panel)
    built = board.build()
    for number, item in enumerate(built.panels or [], start=1):
        item.id_val = number
    return built


def render() -> str:
    """The dashboard as the exact text committed to the repository."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="fail if the output file differs from the code"
    )
    args = parser.parse_args(argv)
    text = render()
    output: Path = args.output
    if args.check:
        if not output.exists() or output.read_text(encoding="utf-8") != text:
            print(f"{output} is stale: run `make dashboards`", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
