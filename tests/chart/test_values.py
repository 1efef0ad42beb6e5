"""values.yaml holds no dead options, the README documents each one, and the chart's copy of
the locustfile is the repo's."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helm import CHART, REPO, VALUE_SETS, Values, default_values, render

README = CHART / "README.md"


def leaves(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every value a user can set, as a dotted path; empty maps and lists count as one value."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, path + ".")
        else:
            yield path, value


LEAVES = dict(leaves(default_values()))

# A value is only read when its feature is on: compare against that value set.
FEATURE_BASE: list[tuple[str, Values]] = [
    ("api.ingress.", VALUE_SETS["ingress-networkpolicy"]),
    ("api.apiKeys.secretKey", {"api": {"apiKeys": {"existingSecret": "keys"}}}),
    ("api.console.", VALUE_SETS["console"]),
    ("api.tenantSecret.secretKey", {"api": {"tenantSecret": {"existingSecret": "t"}}}),
    (
        "api.priorityHighKeys.",
        {"api": {"apiKeys": {"existingSecret": "k"}, "priorityHighKeys": {"existingSecret": "p"}}},
    ),
    ("config.webhookSecret.secretKey", {"config": {"webhookSecret": {"existingSecret": "w"}}}),
    # The chart refuses per-key webhook secrets without API keys to give them to.
    ("config.webhookKeySecrets.existingSecret", {"api": {"apiKeys": {"existingSecret": "k"}}}),
    (
        "config.webhookKeySecrets.secretKey",
        {
            "api": {"apiKeys": {"existingSecret": "k"}},
            "config": {"webhookKeySecrets": {"existingSecret": "w"}},
        },
    ),
    (
        "loadtest.apiKey.secretKey",
        {"loadtest": {"enabled": True, "apiKey": {"existingSecret": "k"}}},
    ),
    ("loadtest.", VALUE_SETS["loadtest"]),
    ("worker.autoscaling.keda.prometheus.", VALUE_SETS["redis-cluster-keda-networkpolicy"]),
    ("worker.autoscaling.keda.", VALUE_SETS["keda"]),
    ("worker.autoscaling.prometheusAdapter.", VALUE_SETS["prometheus-adapter"]),
    ("worker.autoscaling.targetLagPerReplica", VALUE_SETS["keda"]),
    ("worker.replicaCount", {"worker": {"autoscaling": {"enabled": False}}}),
    ("api.autoscaling.", {"api": {"autoscaling": {"enabled": True}}}),
    ("serviceAccount.annotations", {}),
    ("externalRedis.tls.", VALUE_SETS["external-redis-tls-ca"]),
    ("externalRedis.", VALUE_SETS["external-redis"]),
    ("redis.cluster.", VALUE_SETS["redis-cluster"]),
    ("networkPolicy.kedaNamespace", {"networkPolicy": {"enabled": True}, **VALUE_SETS["keda"]}),
    ("clusterDomain", VALUE_SETS["keda"]),
    ("metrics.", VALUE_SETS["monitoring"]),
    ("redis.metrics.", VALUE_SETS["monitoring"]),
]

# Other valid values for leaves whose type alone does not give one.
ALTERNATIVES: dict[str, Any] = {
    "config.keyPrefix": "blue:",
    "config.logFormat": "text",
    "config.logLevel": "DEBUG",
    "config.durableAcks": "fsync",
    "config.queuePartitions": 4,
    "config.durableAckTimeout": 0.5,
    "config.webhookAllowedHosts": ["10.0.0.0/8"],
    "api.priorityHighKeys.existingSecret": "other-high-keys",
    "worker.handlerThreads": 8,
    "worker.handlerPool": "process",
    "worker.autoscaling.keda.prometheus.serverAddress": "http://prometheus.example:9090",
    "otel.exporterOtlpEndpoint": "http://otel-collector.observability:4318",
    "otel.tracesSampler": "always_on",
    "otel.tracesSamplerArg": "0.25",
    "otel.resourceAttributes": "deployment.environment=prod",
    "api.service.type": "NodePort",
    "api.ingress.tls": [{"hosts": ["fastapi-redis-mini.local"], "secretName": "tls"}],
    "redis.appendfsync": "always",
    "redis.mode": "cluster",
    "redis.cluster.podAntiAffinityPreset": "hard",
    "externalRedis.tls.caSecret": "other-ca",
    "redis.maxmemory": "200mb",
    "redis.persistence.size": "2Gi",
    "redis.image.tag": "7.4.7-bookworm",
    **{
        f"{image}.image.digest": "sha256:" + "0123456789abcdef" * 4
        for image in ("api", "worker", "redis", "redis.metrics", "loadtest")
    },
    "clusterDomain": "k8s.example.internal",
    "worker.taskTimeout": 28,
    "externalRedis.url": "redis://other.example.internal:6379/0",
    "metrics.serviceMonitor.interval": "30s",
    "metrics.prometheusRule.runbookBaseUrl": "https://git.example.com/fastapi-redis-mini/blob/main/",
    "metrics.prometheusRule.dashboardBaseUrl": "https://grafana.example.com/",
    "metrics.slo.readAvailability.objective": 0.995,
    "metrics.slo.apiLatency.objective": 0.95,
    "metrics.slo.apiLatency.thresholdSeconds": 0.5,
    "metrics.slo.submitAvailability.objective": 0.995,
    "metrics.slo.queueWait.objective": 0.95,
    "metrics.slo.queueWait.thresholdSeconds": 60,
    "metrics.slo.taskSuccess.objective": 0.95,
    "loadtest.job.runTime": "5m",
    "imagePullSecrets": [{"name": "registry"}],
    "api.tolerations": [{"key": "dedicated", "operator": "Exists"}],
    "worker.tolerations": [{"key": "dedicated", "operator": "Exists"}],
    "redis.tolerations": [{"key": "dedicated", "operator": "Exists"}],
    "api.affinity": {"podAntiAffinity": {}},
    "worker.affinity": {"podAntiAffinity": {}},
    "redis.affinity": {"podAntiAffinity": {}},
    **{
        f"{component}.topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
            }
        ]
        for component in ("api", "worker", "redis")
    },
    "api.extraEnv": [{"name": "HTTP_PROXY", "value": "http://proxy.example:3128"}],
    "worker.extraEnv": [{"name": "HF_HOME", "value": "/tmp/hf"}],
    "worker.autoscaling.behavior.scaleDown.policies": [
        {"type": "Pods", "value": 2, "periodSeconds": 60}
    ],
    "worker.autoscaling.behavior.scaleUp.policies": [
        {"type": "Pods", "value": 4, "periodSeconds": 15}
    ],
}


def other_value(path: str, value: Any) -> Any:
    if path in ALTERNATIVES:
        return ALTERNATIVES[path]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2
    if isinstance(value, dict):
        return {"example.com/marker": "1"}
    if isinstance(value, list):
        return [*value[:-1], value[-1] + "-changed"] if value else ["changed"]
    if path.endswith("pullPolicy"):
        return "Always"
    if path.endswith(("cpu", "memory")):
        return "3" if path.endswith("cpu") else "1Gi"
    return f"{value}-changed" if value else "changed"


def nest(path: str, value: Any) -> Values:
    *parents, last = path.split(".")
    tree: Values = {last: value}
    for key in reversed(parents):
        tree = {key: tree}
    return tree


def lookup(values: Values, path: str) -> Any:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    return node


def merge(base: Values, extra: Values) -> Values:
    merged: Values = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def stable(values: Values) -> str:
    """The rendered objects, without the password generated afresh on every render."""
    objects = []
    for obj in render(values):
        manifest = obj.manifest
        if manifest["kind"] == "Secret":
            manifest["data"] = dict.fromkeys(manifest["data"], "generated")
        objects.append(manifest)
    return json.dumps(objects, sort_keys=True)


# Values read only against the live cluster during an upgrade, where test_upgrade.py shows
# what each changes; and api.allowAnonymous, which turns a refusal into a render
# (tests/chart/test_security.py proves it).
UPGRADE_ONLY = {"redis.cluster.allowLayoutChange"}


@pytest.mark.parametrize("path", sorted(set(LEAVES) - UPGRADE_ONLY - {"api.allowAnonymous"}))
def test_every_value_changes_what_the_chart_renders(path: str) -> None:
    base = next((values for prefix, values in FEATURE_BASE if path.startswith(prefix)), {})
    current = lookup(merge(default_values(), base), path)
    changed = merge(base, nest(path, other_value(path, current)))
    assert stable(changed) != stable(base), f"{path} reaches nothing the chart renders"


def documented_values() -> dict[str, str]:
    """key -> default, from the table under the README's "## Values" heading."""
    section = README.read_text().partition("\n## Values\n")[2]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", section, re.MULTILINE)
    return dict(rows)


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_the_chart_readme_documents_every_value_with_its_default(path: str) -> None:
    documented = documented_values()
    assert path in documented
    default = LEAVES[path]
    shown = f'"{default}"' if isinstance(default, str) else json.dumps(default)
    assert documented[path] == shown


def test_the_chart_readme_documents_no_value_that_does_not_exist() -> None:
    assert set(documented_values()) - set(LEAVES) == set()


def test_the_charts_locustfile_is_the_repos_own(tmp_path: Path) -> None:
    import helm_python

    shipped = CHART / "files" / "locustfile.py"
    source = REPO / "loadtest" / "locustfile.py"
    # A symlink holds only a path on a checkout without symlinks, and Locust would fail on it.
    assert not shipped.is_symlink(), "ship the file itself"
    assert shipped.read_bytes() == source.read_bytes(), (
        "the chart's copy drifted: cp loadtest/locustfile.py charts/fastapi-redis-mini/files/"
    )
    archive = helm_python.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as packaged:
        member = packaged.extractfile(f"{CHART.name}/files/locustfile.py")
        assert member is not None, "helm package left the locustfile out"
        assert member.read() == source.read_bytes()


def test_a_locustfile_that_is_only_a_path_fails_the_render_by_name(tmp_path: Path) -> None:
    import helm_python

    # What a symlink becomes on a checkout without symlinks: a file holding the link's target.
    chart = tmp_path / CHART.name
    shutil.copytree(CHART, chart)
    (chart / "files" / "locustfile.py").write_text("../../../loadtest/locustfile.py")
    with pytest.raises(helm_python.HelmError, match=r"files/locustfile.py holds no Locust user"):
        helm_python.Chart.load(chart).render(VALUE_SETS["loadtest"], name="demo", namespace="t")
