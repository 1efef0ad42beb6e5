"""A real Prometheus scraping a real api, worker and redis_exporter answers every dashboard query.

Prometheus runs with the labels the chart's ServiceMonitors give the targets (namespace,
release, pod), so the committed dashboard and alert rules are used exactly as shipped, with
the threshold group the chart renders for the release. With no cluster here, a stand-in
exporter serves the kube-state-metrics series for the objects the chart renders.
"""

from __future__ import annotations

import math
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.processes import Process, start_api, start_worker
from fastapi_redis_mini_harness.redis_server import RedisServer

from ..chart import helm
from . import _dashboard
from ._kube_state import MemoryLimit, Workload, serve_kube_state
from ._prometheus import Prometheus, Target, run_prometheus, single_value
from ._services import ready
from ._thresholds import chart_threshold_rules

pytestmark = pytest.mark.slow

NAMESPACE = "observability"
RELEASE = "obs"
# Grafana's variables as the test resolves them. One minute covers the whole load phase.
VARIABLES = {"namespace": NAMESPACE, "release": RELEASE, "__rate_interval": "1m"}
RULES = _dashboard.REPO / "charts" / "fastapi-redis-mini" / "files" / "prometheus" / "rules.yaml"
# Every api replica exports the same queue gauges; two of them catch a sum that should be a max.
API_REPLICAS = 2
# rate() sees a counter grow only after its first sample: scrapes between load rounds.
ROUND_PAUSE = 3.0


# Two partitions, so the per-partition gauges and panels have data.
QUEUE_PARTITIONS = "2"


def start_fast_worker(redis_url: str, metrics_port: int) -> Process:
    """A worker whose failing tasks reach FAILED, after one retry, within the test."""
    worker = start_worker(
        redis_url,
        metrics_port=metrics_port,
        wait=False,
        MAX_RETRIES="1",
        QUEUE_PARTITIONS=QUEUE_PARTITIONS,
        RETRY_BACKOFF="0.05",
        RETRY_BACKOFF_MAX="0.1",
    )
    return ready(worker, "/healthz")


@dataclass
class Stack:
    """Two api replicas and one worker on one Redis, scraped by one Prometheus."""

    apis: list[Process]
    worker: Process
    worker_port: int
    prometheus: Prometheus
    redis_url: str
    started: list[Process]

    def restart_worker(self) -> None:
        self.worker = start_fast_worker(self.redis_url, self.worker_port)
        self.started.append(self.worker)


def chart_worker_names(release: str) -> tuple[str, str, str, str]:
    """(worker Deployment, its HPA, api Deployment, Redis pod) as the chart names them."""
    objects = helm.render({}, release=release)
    deployments = {o.name for o in objects if o.kind == "Deployment"}
    (hpa,) = [o.name for o in objects if o.kind == "HorizontalPodAutoscaler"]
    (worker,) = [name for name in deployments if name.endswith("-worker")]
    (api,) = [name for name in deployments if name.endswith("-api")]
    (redis,) = [o.name for o in objects if o.kind == "StatefulSet"]
    return worker, hpa, api, f"{redis}-0"


@contextmanager
def run_redis_exporter(binary: str, redis_url: str) -> Iterator[str]:
    """Debian's build of the upstream redis_exporter, on a free loopback port; yields host:port."""
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [binary, f"-redis.addr={redis_url}", f"-web.listen-address={address}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def one_node_cluster() -> Iterator[RedisServer]:
    """A cluster-enabled server holding every slot: what a cluster node's exporter reports.

    The service runs on the standalone server; this node only gives the cluster panel real
    CLUSTER INFO series (state, failing slots, known nodes) to read.
    """
    server = RedisServer()
    # Its own bus port: a free port above 55535 leaves no room for the default port + 10000.
    server.extra_args = [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-port", str(free_port()),
    ]  # fmt: skip
    try:
        server.start()
        with server.client() as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + 10
            while client.cluster("info")["cluster_state"] != "ok":
                assert time.monotonic() < deadline, "the one-node cluster never reported ok"
                time.sleep(0.05)
        yield server
    finally:
        server.close()


@pytest.fixture
def stack(
    prometheus_binary: str, redis_exporter_binary: str, redis_url: str, tmp_path: Path
) -> Iterator[Stack]:
    worker_deployment, worker_hpa, api_deployment, redis_pod = chart_worker_names(RELEASE)
    cluster = [
        Workload(NAMESPACE, worker_deployment, 3, worker_hpa, hpa_current=3, hpa_desired=5,
                 hpa_max=10, available=2),
        # Decoys the panel must not add in: the api Deployment, another namespace's worker.
        Workload(NAMESPACE, api_deployment, 2),
        Workload("elsewhere", worker_deployment, 7, worker_hpa, hpa_current=7, hpa_desired=7,
                 hpa_max=7),
    ]  # fmt: skip
    started: list[Process] = []
    try:
        for replica in range(API_REPLICAS):
            metrics_dir = tmp_path / f"api-{replica}-metrics"
            api = start_api(
                redis_url,
                wait=False,
                WEB_CONCURRENCY="2",
                PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
                QUEUE_PARTITIONS=QUEUE_PARTITIONS,
            )
            started.append(api)
            ready(api, "/readyz")
        apis = list(started)
        worker_port = free_port()
        started.append(start_fast_worker(redis_url, worker_port))
        labels = {"namespace": NAMESPACE, "release": RELEASE}
        targets = [
            Target("api", api.base_url.removeprefix("http://"), {**labels, "pod": f"api-{n}"})
            for n, api in enumerate(apis)
        ]
        targets.append(Target("worker", f"127.0.0.1:{worker_port}", {**labels, "pod": "worker-0"}))
        limits = [
            MemoryLimit(NAMESPACE, redis_pod, "redis", 512 * 2**20),
            # Decoys the Redis panel must not show: another container, another namespace.
            MemoryLimit(NAMESPACE, redis_pod, "metrics", 64 * 2**20),
            MemoryLimit("elsewhere", redis_pod, "redis", 2**30),
        ]
        with (
            run_redis_exporter(redis_exporter_binary, redis_url) as exporter,
            one_node_cluster() as cluster_node,
            run_redis_exporter(redis_exporter_binary, cluster_node.url) as cluster_exporter,
            serve_kube_state(cluster, limits) as kube_state,
            run_prometheus(
                prometheus_binary,
                tmp_path,
                [
                    *targets,
                    Target("redis", exporter, {**labels, "pod": redis_pod}),
                    Target("redis", cluster_exporter, {**labels, "pod": f"{redis_pod}-cluster"}),
                    Target("kube-state-metrics", kube_state, honor_labels=True),
                ],
                [RULES, chart_threshold_rules(tmp_path / "thresholds.yaml", RELEASE, NAMESPACE)],
            ) as prometheus,
        ):
            targets += [Target("redis", exporter), Target("redis", cluster_exporter)]
            prometheus.wait_for(
                "count(up == 1)",
                lambda samples: single_value(samples) == len(targets) + 1,
                what="every target scraped",
            )
            yield Stack(apis, started[-1], worker_port, prometheus, redis_url, started)
    finally:
        for service in started:
            service.close()


def submit(client: httpx.Client, prompt: str, **params: object) -> str:
    response = client.post("/tasks", json={"prompt": prompt, "params": params})
    assert response.status_code in (200, 202), response.text
    task_id: str = response.json()["task_id"]
    return task_id


def wait_final(client: httpx.Client, task_id: str) -> str:
    for _ in range(10):
        body = client.get(f"/tasks/{task_id}", params={"wait": 5}).json()
        if body["status"] in ("DONE", "FAILED", "CANCELLED"):
            status: str = body["status"]
            return status
    raise AssertionError(f"task {task_id} not finished: {body}")


def load_round(client: httpx.Client) -> None:
    """Queued, cached, failed and retried tasks, plus 404 and 422 answers."""
    prompts = [f"observability load {uuid.uuid4().hex}" for _ in range(10)]
    done = [submit(client, prompt, duration=0.05) for prompt in prompts]
    failing = [submit(client, f"failing {uuid.uuid4().hex}", fail=True) for _ in range(2)]
    assert {wait_final(client, task_id) for task_id in done} == {"DONE"}
    assert {wait_final(client, task_id) for task_id in failing} == {"FAILED"}
    for prompt in prompts[:3]:
        cached = client.post("/tasks", json={"prompt": prompt, "params": {"duration": 0.05}})
        assert cached.json()["cached"] is True, cached.text
    assert client.get(f"/tasks/{uuid.uuid4().hex}").status_code == 404
    assert client.post("/tasks", json={"params": {}}).status_code == 422


def drive_load(api: Process) -> None:
    """The first round creates every labelled series, the second makes them all grow."""
    with httpx.Client(base_url=api.base_url, timeout=30.0) as client:
        load_round(client)
        time.sleep(ROUND_PAUSE)
        load_round(client)


def answers(prometheus: Prometheus, query: _dashboard.PanelQuery) -> bool:
    samples = prometheus.query(query.resolved(VARIABLES))
    return any(math.isfinite(sample.value) for sample in samples)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(stack: Stack) -> None:
    drive_load(stack.apis[0])
    queries = _dashboard.queries(_dashboard.load())
    assert len(queries) >= 25, "the dashboard lost panels"

    # The last scrapes after the load may still be in flight: poll, bounded.
    missing = queries
    deadline = time.monotonic() + 30
    while True:
        missing = [query for query in missing if not answers(stack.prometheus, query)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, "panels without data:\n" + "\n".join(
        f"  {query.panel} [{query.ref_id}]: {query.resolved(VARIABLES)}" for query in missing
    )


def test_scaling_panel_reads_only_this_releases_worker_from_kube_state_metrics(
    stack: Stack,
) -> None:
    scaling = {
        query.legend: query.resolved(VARIABLES)
        for query in _dashboard.queries(_dashboard.load())
        if query.panel == "Worker replicas and autoscaler"
    }
    expected = {"replicas available": 2, "HPA current": 3, "HPA desired": 5, "HPA max": 10}
    assert set(scaling) == set(expected)
    for legend, value in expected.items():
        samples = stack.prometheus.wait_for(
            scaling[legend], lambda samples: bool(samples), what=f"{legend} series"
        )
        assert single_value(samples) == value, (legend, samples)


def test_dashboard_variables_find_the_namespace_and_release(stack: Stack) -> None:
    variables = _dashboard.variable_queries(_dashboard.load())
    for name, expected in (("namespace", NAMESPACE), ("release", RELEASE)):
        selector, label = _label_values_arguments(variables[name].replace("$namespace", NAMESPACE))
        assert label == name
        assert expected in stack.prometheus.label_values(label, selector), variables[name]


def _label_values_arguments(query: str) -> tuple[str, str]:
    """`label_values(selector, label)` -> (selector, label), as Grafana sends them."""
    assert query.startswith("label_values("), query
    assert query.endswith(")"), query
    selector, _, label = query.removeprefix("label_values(").removesuffix(")").rpartition(",")
    return selector.strip(), label.strip()


def test_alert_rules_load_and_evaluate_against_live_series(stack: Stack) -> None:
    def rule_health() -> dict[str, str]:
        return {
            rule["name"]: rule["health"]
            for group in stack.prometheus.rule_groups()
            for rule in group["rules"]
        }

    health = rule_health()
    deadline = time.monotonic() + 20
    while not health or "unknown" in health.values():
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
        health = rule_health()
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    names = {rule.get("alert") or rule["record"] for group in groups for rule in group["rules"]}
    assert names <= set(health), health
    assert "fastapi_redis_mini:config_max_backlog" in health, health
    assert set(health.values()) == {"ok"}, health


def test_backlog_metric_follows_a_real_backlog(stack: Stack) -> None:
    waiting = next(
        query for query in _dashboard.queries(_dashboard.load()) if query.panel == "Waiting tasks"
    ).resolved(VARIABLES)
    lag_per_replica = (
        f'fastapi_redis_mini_stream_lag{{namespace="{NAMESPACE}", release="{RELEASE}"}}'
    )
    backlog = 25

    try:
        exit_code = stack.worker.stop(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker ignored SIGTERM for 20s:\n{stack.worker.log}")
    assert exit_code == 0, stack.worker.log

    clients = [httpx.Client(base_url=api.base_url, timeout=30.0) for api in stack.apis]
    try:
        # Submitted through both replicas, as a Service would spread them.
        submitted = [
            (client, submit(client, f"backlog {uuid.uuid4().hex}", duration=0.01))
            for number in range(backlog)
            for client in [clients[number % len(clients)]]
        ]
        # Each replica reports the whole backlog; the panel's max is what keeps it at N.
        stack.prometheus.wait_for(
            lag_per_replica,
            lambda samples: [sample.value for sample in samples] == [backlog] * API_REPLICAS,
            what=f"lag {backlog} from every api replica",
        )
        assert single_value(stack.prometheus.query(waiting)) == backlog

        stack.restart_worker()
        stack.prometheus.wait_for(waiting, lambda samples: single_value(samples) == 0, what="lag 0")
        assert {wait_final(client, task_id) for client, task_id in submitted} == {"DONE"}
    finally:
        for client in clients:
            client.close()


def test_redis_memory_panel_reads_the_limit_of_this_releases_redis_container(
    stack: Stack,
) -> None:
    (limit,) = [
        query.resolved(VARIABLES)
        for query in _dashboard.queries(_dashboard.load())
        if query.panel == "Redis memory" and query.legend.startswith("limit")
    ]
    samples = stack.prometheus.wait_for(limit, lambda samples: bool(samples), what="limit")
    assert single_value(samples) == 512 * 2**20, samples
