"""A stand-in for kube-state-metrics: the few series the dashboard reads, for named objects.

There is no cluster here, so a small exporter serves what kube-state-metrics would report
about the chart's worker Deployment and HPA (and a decoy Deployment), under their real names,
and the memory limits of named containers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, start_http_server


@dataclass(frozen=True)
class Workload:
    namespace: str
    deployment: str
    replicas: int
    hpa: str | None = None
    hpa_current: int = 0
    hpa_desired: int = 0
    hpa_max: int = 0
    # Ready for at least minReadySeconds; below `replicas` during a rollout or a crash loop.
    available: int | None = None


@dataclass(frozen=True)
class MemoryLimit:
    namespace: str
    pod: str
    container: str
    bytes: int


@contextmanager
def serve_kube_state(
    workloads: list[Workload], limits: list[MemoryLimit] | None = None
) -> Iterator[str]:
    """Serve the series on a free loopback port; yields host:port."""
    registry = CollectorRegistry()
    replicas = Gauge(
        "kube_deployment_status_replicas",
        "Replicas of a Deployment.",
        ["namespace", "deployment"],
        registry=registry,
    )
    available = Gauge(
        "kube_deployment_status_replicas_available",
        "Available replicas of a Deployment.",
        ["namespace", "deployment"],
        registry=registry,
    )
    limit = Gauge(
        "kube_pod_container_resource_limits",
        "Resource limits of a container.",
        ["namespace", "pod", "container", "resource", "unit"],
        registry=registry,
    )
    for entry in limits or []:
        limit.labels(entry.namespace, entry.pod, entry.container, "memory", "byte").set(entry.bytes)
    hpa_series = {
        name: Gauge(name, name, ["namespace", "horizontalpodautoscaler"], registry=registry)
        for name in (
            "kube_horizontalpodautoscaler_status_current_replicas",
            "kube_horizontalpodautoscaler_status_desired_replicas",
            "kube_horizontalpodautoscaler_spec_max_replicas",
        )
    }
    for workload in workloads:
        replicas.labels(workload.namespace, workload.deployment).set(workload.replicas)
        available.labels(workload.namespace, workload.deployment).set(
            workload.replicas if workload.available is None else workload.available
        )
        if workload.hpa is None:
            continue
        for name, value in (
            ("kube_horizontalpodautoscaler_status_current_replicas", workload.hpa_current),
            ("kube_horizontalpodautoscaler_status_desired_replicas", workload.hpa_desired),
            ("kube_horizontalpodautoscaler_spec_max_replicas", workload.hpa_max),
        ):
            hpa_series[name].labels(workload.namespace, workload.hpa).set(value)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
