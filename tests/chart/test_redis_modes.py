"""redis.mode: what cluster and external render, and the combinations the schema refuses."""

from __future__ import annotations

from typing import Any

import pytest

from fastapi_redis_mini.core.redis import Keys
from fastapi_redis_mini.core.settings import Settings

from .helm import (
    NAMESPACE,
    PROMETHEUS,
    QUOTAS_OFF,
    VALUE_SETS,
    RenderError,
    Values,
    find,
    only,
    pod_spec,
    render,
    render_set,
)
from .test_values import merge

FULLNAME = "demo-fastapi-redis-mini"
HEADLESS = f"{FULLNAME}-redis"
POD_DOMAIN = f"{HEADLESS}.{NAMESPACE}.svc.cluster.local"


def redis_container(objects: list[Any]) -> dict[str, Any]:
    statefulset = only(objects, "StatefulSet", "redis")
    (container,) = [c for c in pod_spec(statefulset)["containers"] if c["name"] == "redis"]
    found: dict[str, Any] = container
    return found


def config_lines(objects: list[Any]) -> list[str]:
    text: str = only(objects, "ConfigMap", "redis")["data"]["redis.conf"]
    return text.splitlines()


@pytest.mark.parametrize(("masters", "replicas"), [(3, 1), (3, 2), (4, 2)])
def test_cluster_mode_runs_one_pod_per_node_started_together(masters: int, replicas: int) -> None:
    objects = render(
        {
            "redis": {
                "mode": "cluster",
                "cluster": {"masters": masters, "replicasPerMaster": replicas},
            }
        }
    )
    statefulset = only(objects, "StatefulSet", "redis")
    assert statefulset["spec"]["replicas"] == masters * (1 + replicas)
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    annotations = statefulset["metadata"]["annotations"]
    assert annotations["fastapi-redis-mini/cluster-layout"] == (
        f"{masters} masters x {replicas} replicas"
    )
    (bootstrap,) = [
        c for c in pod_spec(statefulset)["containers"] if c["name"] == "cluster-bootstrap"
    ]
    env = {e["name"]: e.get("value") for e in bootstrap["env"]}
    assert env["REDIS_NODES"].split() == [
        f"{HEADLESS}-{i}.{POD_DOMAIN}:6379" for i in range(masters * (1 + replicas))
    ]
    assert env["REDIS_CLUSTER_REPLICAS"] == str(replicas)


def test_no_hook_creates_the_cluster_so_helm_wait_argo_cd_and_flux_complete() -> None:
    # A post-install hook runs only once every resource is ready, and a node is ready only in
    # a healthy cluster: creation must happen inside the pods.
    objects = render_set("redis-cluster")
    install_hooks = [
        str(o)
        for o in objects
        if o.is_hook and o.manifest["metadata"]["annotations"]["helm.sh/hook"] != "test"
    ]
    assert install_hooks == []
    assert find(objects, "Job") == []


def test_cluster_nodes_keep_their_identity_on_their_volume_and_announce_their_dns_name() -> None:
    objects = render_set("redis-cluster")
    lines = config_lines(objects)
    for line in (
        "cluster-enabled yes",
        "cluster-config-file /data/nodes.conf",
        "cluster-node-timeout 5000",
        "cluster-preferred-endpoint-type hostname",
        "appendonly yes",
        "maxmemory-policy noeviction",
    ):
        assert line in lines
    container = redis_container(objects)
    assert container["command"] == ["sh", "/scripts/start-node.sh"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_POD_DOMAIN"]["value"] == POD_DOMAIN
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert {"name": "bus", "containerPort": 16379, "protocol": "TCP"} in container["ports"]
    statefulset = only(objects, "StatefulSet", "redis")
    assert [c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]] == ["data"]
    service = only(objects, "Service", "redis")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # peers find each other early
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"] == HEADLESS


def test_clients_bootstrap_through_a_service_of_ready_nodes_only() -> None:
    objects = render_set("redis-cluster")
    client = only(objects, "Service", "redis-client")
    assert client["metadata"]["name"] == f"{FULLNAME}-redis-client"
    assert "publishNotReadyAddresses" not in client["spec"]
    pod_labels = only(objects, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert client["spec"]["selector"].items() <= pod_labels.items()
    data = only(objects, "ConfigMap", "config")["data"]
    assert data["REDIS_URL"] == f"redis://fastapi-redis-mini@{FULLNAME}-redis-client:6379/0"


def test_the_cluster_keeps_serving_the_slots_it_has_while_a_shard_is_away() -> None:
    assert "cluster-require-full-coverage no" in config_lines(render_set("redis-cluster"))
    full = render({"redis": {"mode": "cluster", "cluster": {"requireFullCoverage": True}}})
    assert "cluster-require-full-coverage yes" in config_lines(full)


def test_standalone_mode_renders_no_cluster_objects() -> None:
    objects = render_set("defaults")
    assert "cluster-enabled yes" not in config_lines(objects)
    assert find(objects, "Service", "redis-client") == []
    assert find(objects, "PodDisruptionBudget", "redis") == []
    assert [c["name"] for c in pod_spec(only(objects, "StatefulSet", "redis"))["containers"]] == [
        "redis"
    ]
    assert only(objects, "StatefulSet", "redis")["spec"]["replicas"] == 1
    assert "publishNotReadyAddresses" not in only(objects, "Service", "redis")["spec"]


@pytest.mark.parametrize(
    ("preset", "key"),
    [
        ("soft", "preferredDuringSchedulingIgnoredDuringExecution"),
        ("hard", "requiredDuringSchedulingIgnoredDuringExecution"),
    ],
)
def test_cluster_pods_spread_over_nodes(preset: str, key: str) -> None:
    objects = render({"redis": {"mode": "cluster", "cluster": {"podAntiAffinityPreset": preset}}})
    statefulset = only(objects, "StatefulSet", "redis")
    anti = pod_spec(statefulset)["affinity"]["podAntiAffinity"]
    assert list(anti) == [key]
    (term,) = anti[key]
    term = term.get("podAffinityTerm", term)
    assert term["topologyKey"] == "kubernetes.io/hostname"
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_an_explicit_affinity_replaces_the_preset() -> None:
    mine = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["redis"]}]}
                ]
            }
        }
    }
    objects = render({"redis": {"mode": "cluster", "affinity": mine}})
    assert pod_spec(only(objects, "StatefulSet", "redis"))["affinity"] == mine


def test_a_budget_lets_a_drain_take_one_cluster_pod_at_a_time() -> None:
    objects = render_set("redis-cluster")
    budget = only(objects, "PodDisruptionBudget", "redis")
    assert budget["spec"]["maxUnavailable"] == 1
    pod_labels = only(objects, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_keda_reads_one_partitions_lag_through_the_cluster_scaler() -> None:
    one_partition = {"config": {"queuePartitions": 1}}
    objects = render(merge(merge(VALUE_SETS["redis-cluster"], VALUE_SETS["keda"]), one_partition))
    (trigger,) = only(objects, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "redis-cluster-streams"
    # The client Service: only nodes in a healthy cluster, from KEDA's namespace too.
    assert trigger["metadata"]["addresses"] == (
        f"{FULLNAME}-redis-client.{NAMESPACE}.svc.cluster.local:6379"
    )
    assert "databaseIndex" not in trigger["metadata"]
    # The stream's name on a cluster, as the queue's keys build it.
    settings = Settings(key_prefix="blue:", queue_partitions=1)
    objects = render(
        merge(
            merge(VALUE_SETS["redis-cluster"], VALUE_SETS["keda"]),
            {"config": {"keyPrefix": "blue:", "queuePartitions": 1}},
        )
    )
    (trigger,) = only(objects, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["metadata"]["stream"] == Keys.from_settings(settings, cluster=True).stream


def test_keda_scales_a_partitioned_queue_on_the_apis_summed_lag() -> None:
    # A cluster's default of 16 partitions: one trigger on the sum, not one per partition (an
    # HPA would take the largest partition's lag).
    objects = render_set("redis-cluster-keda-networkpolicy")
    (trigger,) = only(objects, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["serverAddress"] == PROMETHEUS
    # The gauge every api replica exports summed over the partitions; max over the replicas.
    assert trigger["metadata"]["query"] == (
        "max(fastapi_redis_mini_stream_lag"
        '{namespace="tasks",release="demo",stream="task_stream",group="workers"})'
    )
    assert (trigger["metadata"]["threshold"], trigger["metadata"]["activationThreshold"]) == (
        "20",
        "0",
    )
    assert "authenticationRef" not in trigger
    assert not find(objects, "TriggerAuthentication")  # KEDA reads Prometheus, not Redis
    # A standalone Redis split in partitions scales the same way.
    partitioned = merge(
        VALUE_SETS["redis-cluster-keda-networkpolicy"],
        {"redis": {"mode": "standalone"}, "config": {"queuePartitions": 4}},
    )
    (trigger,) = only(render(partitioned), "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "prometheus"


def test_keda_scales_priority_lanes_on_the_lag_plus_the_lanes_depth() -> None:
    # Lanes hold the backlog the stream used to; the stream's own lag stays near 0.
    lanes = merge(VALUE_SETS["redis-cluster-keda-networkpolicy"],
                  {"redis": {"mode": "standalone"}, "config": {"priorityLanes": True}})  # fmt: skip
    objects = render(lanes)
    (trigger,) = only(objects, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    # Selected by release too, so two releases in one namespace are never summed together.
    selector = 'namespace="tasks",release="demo",stream="task_stream",group="workers"'
    assert trigger["metadata"]["query"] == (
        f"max(fastapi_redis_mini_stream_lag{{{selector}}}) + "
        f"sum(max by (priority) (fastapi_redis_mini_lane_depth{{{selector}}}))"
    )
    data = only(objects, "ConfigMap", "config")["data"]
    assert (data["PRIORITY_LANES"], data["QUEUE_PARTITIONS"]) == ("true", "1")
    without = merge(VALUE_SETS["keda"], {"config": {"priorityLanes": True}})
    with pytest.raises(RenderError, match=r"config\.priorityLanes"):
        render(without)


def test_a_partitioned_queue_scaled_by_keda_needs_a_prometheus_to_ask() -> None:
    values = merge(VALUE_SETS["redis-cluster"], VALUE_SETS["keda"])
    with pytest.raises(RenderError, match=r"worker\.autoscaling\.keda\.prometheus\.serverAddress"):
        render(values)


@pytest.mark.parametrize(
    ("values", "partitions"),
    [
        ({}, "1"),
        ({"redis": {"mode": "cluster"}, "api": QUOTAS_OFF}, "16"),
        # Lanes order in one partition, as the service's own default has it.
        ({"redis": {"mode": "cluster"}, "api": QUOTAS_OFF, "config": {"priorityLanes": True}}, "1"),
        (
            {"redis": {"mode": "cluster"}, "api": QUOTAS_OFF, "config": {"queuePartitions": 4}},
            "4",
        ),
        # Per-key quotas (on by default) count in one partition, as the service has it.
        ({"redis": {"mode": "cluster"}}, "1"),
        ({"redis": {"mode": "cluster"}, "api": {**QUOTAS_OFF, "maxUnfinishedPerKey": 5}}, "1"),
    ],
)
def test_the_service_is_told_its_partitions_per_mode(
    values: dict[str, Any], partitions: str
) -> None:
    data = only(render(values), "ConfigMap", "config")["data"]
    assert data["QUEUE_PARTITIONS"] == partitions
    external = only(render_set("external-redis"), "ConfigMap", "config")["data"]
    assert "QUEUE_PARTITIONS" not in external  # the service decides at start


def test_the_schema_refuses_a_partition_count_below_one() -> None:
    with pytest.raises(RenderError, match="queuePartitions"):
        render({"config": {"queuePartitions": 0}})


@pytest.mark.parametrize(("mode", "setting"), [("standalone", "false"), ("cluster", "true")])
def test_the_service_is_told_which_kind_of_redis_the_chart_deployed(
    mode: str, setting: str
) -> None:
    data = only(render({"redis": {"mode": mode}}), "ConfigMap", "config")["data"]
    assert data["REDIS_CLUSTER"] == setting
    external = only(render_set("external-redis"), "ConfigMap", "config")["data"]
    assert "REDIS_CLUSTER" not in external  # asked at start: auto


def test_network_policy_lets_nodes_gossip_and_replicate() -> None:
    objects = render_set("redis-cluster-keda-networkpolicy")
    (policy,) = find(objects, "NetworkPolicy", "redis")
    rules = policy.manifest["spec"]["ingress"]
    peers = {
        rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: rule["ports"]
        for rule in rules
        if "from" in rule and len(rule["from"]) == 1 and "podSelector" in rule["from"][0]
    }
    assert {"port": "bus", "protocol": "TCP"} in peers["redis"]
    assert {"port": "redis", "protocol": "TCP"} in peers["redis"]


def test_external_mode_deploys_no_redis_and_mounts_the_ca_for_a_tls_url() -> None:
    objects = render_set("external-redis-tls-ca")
    assert find(objects, "StatefulSet", "redis") == []
    assert find(objects, "Service", "redis-client") == []
    url = only(objects, "ConfigMap", "config")["data"]["REDIS_URL"]
    assert url == (
        "rediss://redis.example.internal:6380/2"
        "?ssl_ca_certs=/etc/fastapi-redis-mini/redis-ca/ca.crt"
    )
    for component in ("api", "worker"):
        spec = pod_spec(only(objects, "Deployment", component))
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["redis-ca"]["secret"]["secretName"] == "managed-redis-ca"
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["redis-ca"]["mountPath"] == "/etc/fastapi-redis-mini/redis-ca"
    auth = only(objects, "TriggerAuthentication", "worker")
    assert {"parameter": "ca", "name": "managed-redis-ca", "key": "ca.crt"} in auth["spec"][
        "secretTargetRef"
    ]


def test_external_mode_without_a_ca_keeps_the_url_as_given() -> None:
    objects = render_set("external-redis")
    url = only(objects, "ConfigMap", "config")["data"]["REDIS_URL"]
    assert url == "rediss://redis.example.internal:6380/2"
    spec = pod_spec(only(objects, "Deployment", "api"))
    assert "redis-ca" not in {v["name"] for v in spec["volumes"]}


EXTERNAL = {"url": "redis://r.example:6379/0", "existingSecret": "s"}


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (
            {"redis": {"mode": "cluster", "persistence": {"enabled": False}}},
            "/redis/persistence/enabled",
        ),
        ({"redis": {"mode": "cluster", "cluster": {"masters": 2}}}, "/redis/cluster/masters"),
        # A master without a replica: a drain the budget allows would take its slots away.
        (
            {"redis": {"mode": "cluster", "cluster": {"replicasPerMaster": 0}}},
            "/redis/cluster/replicasPerMaster",
        ),
        ({"redis": {"mode": "sentinel"}}, "/redis/mode"),
        (
            {
                "redis": {"mode": "cluster", "cluster": {"replicasPerMaster": 0}},
                "config": {"durableAcks": "replica"},
            },
            "/redis/cluster/replicasPerMaster",
        ),
        ({"redis": {"enabled": False}}, "'enabled' not allowed"),
        ({"externalRedis": EXTERNAL}, "/externalRedis/url"),
        (
            {"redis": {"mode": "cluster"}, "externalRedis": {"existingSecret": "s"}},
            "/externalRedis/existingSecret",
        ),
        (
            {"redis": {"mode": "external"}, "externalRedis": {"existingSecret": "s"}},
            "/externalRedis/url",
        ),
        (
            {"redis": {"mode": "external"}, "externalRedis": {"url": EXTERNAL["url"]}},
            "/externalRedis/existingSecret",
        ),
        (
            {
                "redis": {"mode": "external"},
                "externalRedis": {**EXTERNAL, "tls": {"caSecret": "ca"}},
            },
            "/externalRedis/url': 'redis://r.example:6379/0' does not match pattern '\\^rediss://'",
        ),
    ],
)
def test_the_schema_refuses_bad_redis_combinations_naming_the_field(
    values: Values, field: str
) -> None:
    with pytest.raises(RenderError, match=field):
        render(values)


@pytest.mark.parametrize("durable_acks", ["replica", "fsync"])
def test_cluster_mode_passes_durable_acks_to_the_service(durable_acks: str) -> None:
    # The service pipelines each script and its wait to the slot's master, and checks every
    # master at start; the chart's cluster pods keep an append-only file each.
    objects = render({"redis": {"mode": "cluster"}, "config": {"durableAcks": durable_acks}})
    data = only(objects, "ConfigMap", "config")["data"]
    assert (data["DURABLE_ACKS"], data["REDIS_CLUSTER"]) == (durable_acks, "true")
    assert "appendonly yes" in config_lines(objects)


def test_the_allowed_combinations_render() -> None:
    for values in (
        {"redis": {"mode": "external"}, "externalRedis": EXTERNAL},
        {"redis": {"mode": "cluster", "cluster": {"replicasPerMaster": 2}}},
        {"redis": {"mode": "standalone", "persistence": {"enabled": False}}},
    ):
        assert render(values)


def exported_stream_label(settings: Settings, *, cluster: bool) -> str:
    """The `stream` label of the api's lag gauge: the stream's key for one partition, the
    queue's name for the sum over several (core/redis/queue.py, stats)."""
    if settings.queue_partitions == 1:
        return Keys.from_settings(settings, cluster=cluster).stream
    return settings.queue_key


@pytest.mark.parametrize("mode", ["standalone", "cluster"])
@pytest.mark.parametrize("partitions", [1, 4])
def test_the_autoscalers_select_the_lag_this_release_exports(mode: str, partitions: int) -> None:
    config = {"keyPrefix": "blue:", "queuePartitions": partitions}
    settings = Settings(key_prefix="blue:", queue_partitions=partitions)
    expected = exported_stream_label(settings, cluster=mode == "cluster")
    adapter = render(
        merge(VALUE_SETS["prometheus-adapter"], {"redis": {"mode": mode}, "config": config})
    )
    external = only(adapter, "HorizontalPodAutoscaler", "worker")["spec"]["metrics"][0]
    assert external["external"]["metric"]["selector"]["matchLabels"] == {
        "release": "demo",
        "stream": expected,
        "group": "workers",
    }
    keda = merge(VALUE_SETS["redis-cluster-keda-networkpolicy"], {"redis": {"mode": mode}})
    keda = merge(keda, {"config": config})
    (trigger,) = only(render(keda), "ScaledObject", "worker")["spec"]["triggers"]
    if partitions > 1:
        assert trigger["metadata"]["query"] == (
            "max(fastapi_redis_mini_stream_lag"
            f'{{namespace="tasks",release="demo",stream="{expected}",group="workers"}})'
        )
    else:
        assert (
            trigger["metadata"]["stream"]
            == Keys.from_settings(settings, cluster=mode == "cluster").stream
        )


def test_keda_holds_the_worker_at_its_fallback_when_it_cannot_read_the_lag() -> None:
    scaled = only(render_set("redis-cluster-keda-networkpolicy"), "ScaledObject", "worker")
    assert scaled["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 2}


def test_an_external_cluster_is_declared_and_keda_logs_in_as_the_urls_user() -> None:
    values = merge(
        VALUE_SETS["external-redis"],
        {
            "externalRedis": {"url": "rediss://app@redis.example.internal:6380/0", "cluster": True},
            "config": {"queuePartitions": 1},
            **VALUE_SETS["keda"],
        },
    )
    objects = render(values)
    data = only(objects, "ConfigMap", "config")["data"]
    assert (data["REDIS_CLUSTER"], data["QUEUE_PARTITIONS"]) == ("true", "1")
    (trigger,) = only(objects, "ScaledObject", "worker")["spec"]["triggers"]
    assert trigger["type"] == "redis-cluster-streams"
    settings = Settings(queue_partitions=1)
    assert trigger["metadata"]["stream"] == Keys.from_settings(settings, cluster=True).stream
    # KEDA's scaler reads the user from the scale target's environment.
    assert trigger["metadata"]["usernameFromEnv"] == "REDIS_USERNAME"
    worker = pod_spec(only(objects, "Deployment", "worker"))["containers"][0]
    assert {"name": "REDIS_USERNAME", "value": "app"} in worker["env"]
    # Left alone, the partitions follow the service's cluster default: one while the per-key
    # quotas (on by default) count there, 16 with them off.
    values["config"] = {}
    values["worker"]["autoscaling"]["keda"]["prometheus"] = {"serverAddress": PROMETHEUS}
    assert only(render(values), "ConfigMap", "config")["data"]["QUEUE_PARTITIONS"] == "1"
    values["api"] = {**values.get("api", {}), **QUOTAS_OFF}
    assert only(render(values), "ConfigMap", "config")["data"]["QUEUE_PARTITIONS"] == "16"
