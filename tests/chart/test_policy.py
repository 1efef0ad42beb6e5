"""Hygiene rules every rendered workload follows, for every value set.

Each test names one rule; removing that rule from the chart makes the test fail.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pytest

from .helm import VALUE_SETS, Rendered, component_of, find, pod_spec, render, render_set

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "Pod"}
RECOMMENDED_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
# The service's own long-running processes, and the uid each runs as.
SERVICE_USERS = {"api": 10001, "worker": 10001, "redis": 999}
# Run-to-completion pods and Locust's workers serve nothing a probe could ask.
UNPROBED = {"locust-worker", "locust-job", "test"}
# A sidecar that serves nothing: its work shows in the redis container's readiness.
UNPROBED_CONTAINERS = {"cluster-bootstrap"}
# Labels that change with every chart version: on a stateful pod each change is a restart.
VERSIONED_LABELS = {"helm.sh/chart", "app.kubernetes.io/version"}

ALL_SETS = pytest.mark.parametrize("value_set", VALUE_SETS)


def workloads(value_set: str) -> list[Rendered]:
    return [o for o in render_set(value_set) if o.kind in WORKLOAD_KINDS]


def containers(workload: Rendered) -> list[dict[str, Any]]:
    spec = pod_spec(workload.manifest)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@ALL_SETS
def test_every_object_carries_helms_recommended_labels(value_set: str) -> None:
    for obj in render_set(value_set):
        missing = RECOMMENDED_LABELS - set(obj.manifest["metadata"].get("labels", {}))
        assert missing == set(), f"{obj} lacks {missing}"


@ALL_SETS
def test_every_pod_template_carries_the_labels_its_selector_matches(value_set: str) -> None:
    for workload in workloads(value_set):
        if workload.kind in ("Pod", "Job"):
            labels = (
                workload.manifest["metadata"]["labels"]
                if workload.kind == "Pod"
                else (workload.manifest["spec"]["template"]["metadata"]["labels"])
            )
            assert set(labels) >= RECOMMENDED_LABELS, str(workload)
            continue
        template_labels = workload.manifest["spec"]["template"]["metadata"]["labels"]
        selector = workload.manifest["spec"]["selector"]["matchLabels"]
        if workload.kind == "StatefulSet":
            # A chart bump alone must not restart Redis.
            assert set(template_labels) >= RECOMMENDED_LABELS - VERSIONED_LABELS, str(workload)
            assert not VERSIONED_LABELS & set(template_labels), str(workload)
        else:
            assert set(template_labels) >= RECOMMENDED_LABELS, str(workload)
        assert selector.items() <= template_labels.items(), str(workload)


@ALL_SETS
def test_every_template_file_is_named_after_the_one_kind_it_renders(value_set: str) -> None:
    kinds_per_file: dict[str, set[str]] = {}
    for obj in render_set(value_set):
        kinds_per_file.setdefault(obj.source, set()).add(obj.kind)
    for source, kinds in kinds_per_file.items():
        assert len(kinds) == 1, f"{source} renders {kinds}"
        (kind,) = kinds
        assert kind.lower() in PurePosixPath(source).stem.replace("-", ""), source


@ALL_SETS
def test_every_container_has_cpu_and_memory_requests_and_limits(value_set: str) -> None:
    for workload in workloads(value_set):
        for container in containers(workload):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), (
                    f"{workload} container {container['name']} {bound}"
                )


@ALL_SETS
def test_every_long_running_container_has_liveness_readiness_and_startup_probes(
    value_set: str,
) -> None:
    probed = 0
    for workload in workloads(value_set):
        if component_of(workload) in UNPROBED:
            continue
        for container in containers(workload):
            if container["name"] in UNPROBED_CONTAINERS:
                continue
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert probe in container, f"{workload} container {container['name']} lacks {probe}"
            probed += 1
    assert probed >= 2


@ALL_SETS
def test_every_pod_runs_as_non_root_with_runtime_default_seccomp(value_set: str) -> None:
    for workload in workloads(value_set):
        context = pod_spec(workload.manifest)["securityContext"]
        assert context["runAsNonRoot"] is True, str(workload)
        assert context["runAsUser"] != 0, str(workload)
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, str(workload)


@ALL_SETS
def test_service_pods_run_as_the_uid_their_image_was_built_for(value_set: str) -> None:
    for workload in workloads(value_set):
        component = component_of(workload)
        expected = 10001 if component == "test" else SERVICE_USERS.get(component)
        if expected is not None:
            assert pod_spec(workload.manifest)["securityContext"]["runAsUser"] == expected, str(
                workload
            )


@ALL_SETS
def test_every_container_has_a_read_only_root_no_capabilities_and_no_escalation(
    value_set: str,
) -> None:
    for workload in workloads(value_set):
        for container in containers(workload):
            context = container["securityContext"]
            where = f"{workload} container {container['name']}"
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where


@ALL_SETS
def test_every_container_writes_only_to_emptydir_tmp(value_set: str) -> None:
    for workload in workloads(value_set):
        volumes = {v["name"]: v for v in pod_spec(workload.manifest).get("volumes", [])}
        for container in containers(workload):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, (
                f"{workload} container {container['name']} has no writable /tmp"
            )
            assert "emptyDir" in volumes[mounts["/tmp"]], str(workload)


@ALL_SETS
def test_no_pod_and_no_service_account_mounts_an_api_token(value_set: str) -> None:
    objects = render_set(value_set)
    for workload in workloads(value_set):
        assert pod_spec(workload.manifest)["automountServiceAccountToken"] is False, str(workload)
    for account in find(objects, "ServiceAccount"):
        assert account.manifest["automountServiceAccountToken"] is False


@ALL_SETS
def test_api_and_worker_each_have_a_pod_disruption_budget_matching_their_pods(
    value_set: str,
) -> None:
    objects = render_set(value_set)
    for component in ("api", "worker"):
        (deployment,) = find(objects, "Deployment", component)
        (budget,) = find(objects, "PodDisruptionBudget", component)
        pod_labels = deployment.manifest["spec"]["template"]["metadata"]["labels"]
        selector = budget.manifest["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        assert "maxUnavailable" in budget.manifest["spec"]


def test_only_api_and_worker_pods_may_reach_redis_under_the_network_policy() -> None:
    objects = render_set("ingress-networkpolicy")
    (policy,) = find(objects, "NetworkPolicy", "redis")
    spec = policy.manifest["spec"]
    (redis,) = find(objects, "StatefulSet", "redis")
    assert spec["podSelector"]["matchLabels"].items() <= (
        redis.manifest["spec"]["template"]["metadata"]["labels"].items()
    )
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    allowed = [
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]
    ]
    assert sorted(allowed) == ["api", "worker"]
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, (
            "a peer without a pod selector opens Redis to more pods"
        )
        assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "demo"
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]


def test_network_policy_lets_kedas_operator_read_the_lag_when_keda_scales_the_worker() -> None:
    objects = render({"networkPolicy": {"enabled": True}, **VALUE_SETS["keda"]})
    (policy,) = find(objects, "NetworkPolicy", "redis")
    (rule,) = policy.manifest["spec"]["ingress"]
    keda_peers = [p for p in rule["from"] if "namespaceSelector" in p]
    assert keda_peers == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
        }
    ]


def test_network_policies_cover_api_worker_and_redis_by_default() -> None:
    objects = render_set("defaults")
    policies = {component_of(p): p.manifest["spec"] for p in find(objects, "NetworkPolicy")}
    assert sorted(policies) == ["api", "redis", "worker"]
    for component, spec in policies.items():
        (deployment_or_set,) = [
            o
            for o in objects
            if o.kind in ("Deployment", "StatefulSet") and component_of(o) == component
        ]
        labels = deployment_or_set.manifest["spec"]["template"]["metadata"]["labels"]
        assert spec["podSelector"]["matchLabels"].items() <= labels.items(), component
        assert spec["policyTypes"] == ["Ingress"]
    # The api takes its HTTP and metrics ports only; the worker its metrics port only.
    assert [p["port"] for p in policies["api"]["ingress"][0]["ports"]] == ["http", "metrics"]
    assert [p["port"] for p in policies["worker"]["ingress"][0]["ports"]] == ["metrics"]


def test_no_network_policy_when_turned_off() -> None:
    assert find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


@ALL_SETS
def test_every_service_routes_to_a_named_port_of_the_pods_it_selects(value_set: str) -> None:
    objects = render_set(value_set)
    pods = [w for w in workloads(value_set) if w.kind in ("Deployment", "StatefulSet")]
    for service in find(objects, "Service"):
        selector = service.manifest["spec"]["selector"]
        (target,) = [
            w
            for w in pods
            if selector.items() <= w.manifest["spec"]["template"]["metadata"]["labels"].items()
        ]
        port_names = {p["name"] for c in containers(target) for p in c.get("ports", [])}
        for port in service.manifest["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service} -> {target}: {port}"


@ALL_SETS
def test_every_budget_lets_a_drain_evict_a_pod_that_is_not_ready(value_set: str) -> None:
    # The default (IfHealthyBudget) blocks a node drain behind a crash-looping pod forever.
    budgets = find(render_set(value_set), "PodDisruptionBudget")
    assert budgets
    for budget in budgets:
        assert budget.manifest["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", str(budget)
