"""The chart lints, renders, and every object it renders is valid Kubernetes, for each value set."""

from __future__ import annotations

import copy

import pytest

from . import kube_schema
from .helm import VALUE_SETS, RenderError, backend, lint, render, render_set

KUBE_VERSIONS = [kube_schema.OLDEST, kube_schema.NEWEST]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_lints_clean_in_strict_mode(value_set: str, kube_version: str) -> None:
    problems = lint(VALUE_SETS[value_set], f"v{kube_version}.0")
    assert problems == [], f"helm lint --strict ({backend()}): {problems}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_value_set_renders(value_set: str) -> None:
    objects = render_set(value_set)
    kinds = {o.kind for o in objects}
    assert {"Deployment", "ConfigMap", "Service"} <= kinds, f"{backend()} rendered {kinds}"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_is_valid_for_the_kubernetes_api(value_set: str, kube_version: str) -> None:
    objects = [o.manifest for o in render_set(value_set)]
    builtin = [o for o in objects if kube_schema.is_builtin(o, kube_version)]
    unknown = {
        (o["apiVersion"], o["kind"]) for o in objects if o not in builtin
    } - kube_schema.crd_kinds()
    assert unknown == set(), f"neither Kubernetes {kube_version} nor a committed CRD knows these"
    failures = {
        f"{o['kind']}/{o['metadata']['name']}": errors
        for o in builtin
        if (errors := kube_schema.errors_builtin(o, kube_version))
    }
    assert failures == {}, f"strict schema of Kubernetes {kube_version}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_custom_resource_is_valid_for_its_crd(value_set: str) -> None:
    custom = [
        o.manifest
        for o in render_set(value_set)
        if (o.manifest["apiVersion"], o.kind) in kube_schema.crd_kinds()
    ]
    failures = {
        f"{o['kind']}/{o['metadata']['name']}": errors
        for o in custom
        if (errors := kube_schema.errors_crd(o))
    }
    assert failures == {}


def test_every_committed_crd_schema_is_used_by_some_value_set() -> None:
    rendered = {(o.manifest["apiVersion"], o.kind) for name in VALUE_SETS for o in render_set(name)}
    unused = kube_schema.crd_kinds() - rendered
    assert unused == set(), (
        "a CRD schema no value set exercises is dead weight, or a value set is missing"
    )


def test_schema_validation_catches_a_misspelt_field() -> None:
    objects = render_set("keda")
    deployment = next(o.manifest for o in objects if o.kind == "Deployment")
    scaled_object = next(o.manifest for o in objects if o.kind == "ScaledObject")
    broken_deployment = copy.deepcopy(deployment)
    broken_deployment["spec"]["replica"] = 3
    broken_scaled_object = copy.deepcopy(scaled_object)
    broken_scaled_object["spec"]["maxReplicas"] = 3
    for version in KUBE_VERSIONS:
        assert kube_schema.errors_builtin(broken_deployment, version)
    assert kube_schema.errors_crd(broken_scaled_object)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"worker": {"maxConcurency": 3}}, "maxConcurency"),
        ({"worker": {"maxConcurrency": "five"}}, "maxConcurrency"),
        ({"redis": {"appendfsync": "sometimes"}}, "appendfsync"),
        ({"redis": {"persistence": {"size": "lots"}}}, "size"),
        ({"config": {"logFormat": "xml"}}, "logFormat"),
        ({"api": {"port": 70000}}, "port"),
        ({"externalRedis": {"url": "http://redis:6379"}}, "url"),
        ({"loadtest": {"job": {"runTime": "two minutes"}}}, "runTime"),
        ({"redis": {"maxmemory": "lots"}}, "maxmemory"),
        ({"clusterDomain": "cluster local"}, "clusterDomain"),
        ({"api": {"console": {"enabled": True}}}, "existingSecret"),
        ({"api": {"console": {"enabled": "yes"}}}, "enabled"),
        ({"api": {"console": {"adminKey": {"secret": "s"}}}}, "secret"),
        ({"config": {"recentTasks": -1}}, "recentTasks"),
        ({"config": {"redisSocketTimeout": 1}}, "redisSocketTimeout"),
        ({"config": {"webhookAllowedHosts": "10.0.0.0/8"}}, "webhookAllowedHosts"),
        ({"config": {"webhookAllowedHosts": ["a.example,b.example"]}}, "webhookAllowedHosts"),
        ({"config": {"webhookSecret": "whsec_abc"}}, "webhookSecret"),
        ({"config": {"webhookKeySecrets": "key=whsec_abc"}}, "webhookKeySecrets"),
        ({"worker": {"webhookMaxAttempts": 50}}, "webhookMaxAttempts"),
        ({"worker": {"webhookTimeout": 0}}, "webhookTimeout"),
        ({"api": {"maxHeaderBytes": 100}}, "maxHeaderBytes"),
        ({"api": {"tenantSecret": {"existingSecret": 5}}}, "existingSecret"),
    ],
)
def test_values_schema_rejects_typos_and_wrong_types(
    values: dict[str, object], complaint: str
) -> None:
    with pytest.raises(RenderError, match=complaint):
        render(values)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (
            {"worker": {"shutdownGrace": 40, "terminationGracePeriodSeconds": 40}},
            "terminationGracePeriodSeconds .* must exceed worker.shutdownGrace",
        ),
        (
            {"worker": {"taskTimeout": 60}},
            r"worker.shutdownGrace \(30\) must be at least worker.taskTimeout \(60\)",
        ),
        (
            {"config": {"resultExpiry": 50}},
            r"worker.taskTimeout \(30\) must be at most half of config.resultExpiry \(50\)",
        ),
        (
            {"worker": {"maxTaskDuration": 40, "taskTimeout": 30}},
            r"worker.maxTaskDuration \(40\) must not exceed worker.taskTimeout \(30\)",
        ),
        (
            {"api": {"drainTimeout": 40}},
            r"api.terminationGracePeriodSeconds \(45\) must exceed api.preStopSeconds \+ "
            r"api.drainTimeout \(5 \+ 40\)",
        ),
        (
            {"redis": {"maxmemory": "512mb"}},
            r"redis.maxmemory \(512mb = 536870912 bytes\) must be at most 75% of "
            r"redis.resources.limits.memory \(512Mi = 536870912 bytes\)",
        ),
        (
            # A quarter of the limit stays free for the AOF rewrite's fork.
            {"redis": {"maxmemory": "769mb", "resources": {"limits": {"memory": "1Gi"}}}},
            r"redis.maxmemory \(769mb = 806354944 bytes\) must be at most 75%",
        ),
        (
            {"redis": {"maxmemory": "768mb", "resources": {"limits": {"memory": "1Gi"}}}},
            None,
        ),
        (
            {"redis": {"resources": {"limits": {"memory": None}}}},
            "redis.resources.limits.memory is required",
        ),
        (
            {
                "worker": {
                    "autoscaling": {
                        "keda": {"enabled": True},
                        "prometheusAdapter": {"enabled": True},
                    }
                }
            },
            "not both",
        ),
        (
            {"config": {"durableAckTimeout": 2, "redisSocketTimeout": 2}},
            r"config.durableAckTimeout \(2\) must be below config.redisSocketTimeout \(2\)",
        ),
        (
            {"worker": {"webhookBackoff": 90}},
            r"worker.webhookBackoff \(90\) must not exceed worker.webhookBackoffMax \(60\)",
        ),
        (
            {"redis": {"mode": "external"}, "externalRedis": {"existingSecret": "s"}},
            "externalRedis.url",
        ),
        (
            {"redis": {"mode": "external"}, "externalRedis": {"url": "redis://r:6379/0"}},
            "externalRedis.existingSecret",
        ),
    ],
)
def test_chart_refuses_contradictory_values_with_a_clear_message(
    values: dict[str, object], complaint: str | None
) -> None:
    if complaint is None:  # the edge that is still allowed: 768mb is 75% of 1Gi
        assert render(values)
        return
    with pytest.raises(RenderError, match=complaint):
        render(values)
