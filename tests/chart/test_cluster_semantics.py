"""What a cluster makes of the rendered release: which names resolve from where, which pods
NetworkPolicies let in, which changes roll which pods, and whether the limits hold.

Each consumer is named with what it needs ("resolvable from namespace keda"), not with what a
template writes; tests/chart/cluster.py models the cluster rules these rely on.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from .cluster import Pod, Service, admits, is_fully_qualified, resolve
from .helm import (
    CHART,
    NAMESPACE,
    RELEASE,
    REPO,
    VALUE_SETS,
    Rendered,
    Values,
    anonymous_unless_keyed,
    component_of,
    find,
    load_all,
    only,
    pod_spec,
    render,
    render_set,
)

K8S = REPO / "k8s"
# Where mk/k8s.mk installs the add-ons (test_local_cluster checks the Makefile agrees).
KEDA_NAMESPACE = "keda"
MONITORING_NAMESPACE = "monitoring"
# Labels the add-ons' own pods carry: the keda chart's operator Deployment, and the
# Prometheus Operator's Prometheus StatefulSet.
KEDA_OPERATOR = Pod(KEDA_NAMESPACE, {"app.kubernetes.io/name": "keda-operator"})
PROMETHEUS = Pod(MONITORING_NAMESPACE, {"app.kubernetes.io/name": "prometheus"})


def merge(base: Values, extra: Values) -> Values:
    merged: Values = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def services(objects: list[Rendered]) -> list[Service]:
    return [Service(o.name, NAMESPACE) for o in find(objects, "Service")]


def service_targets(objects: list[Rendered], name: str) -> set[str]:
    """The components whose pods a Service of the release sends traffic to."""
    service = next(o.manifest for o in find(objects, "Service") if o.name == name)
    return {
        component_of(w)
        for w in objects
        if w.kind in ("Deployment", "StatefulSet")
        and service["spec"]["selector"].items()
        <= w.manifest["spec"]["template"]["metadata"]["labels"].items()
    }


def env_values(manifest: dict[str, Any]) -> dict[str, str]:
    return {
        e["name"]: e["value"]
        for c in pod_spec(manifest)["containers"]
        for e in c.get("env", [])
        if "value" in e
    }


def settings_of(objects: list[Rendered]) -> dict[str, str]:
    data: dict[str, str] = only(objects, "ConfigMap", "config")["data"]
    return data


# -- names -------------------------------------------------------------------------------

CLUSTER_DOMAINS = ["cluster.local", "k8s.example.internal"]


@pytest.mark.parametrize("domain", CLUSTER_DOMAINS)
def test_keda_reaches_redis_by_a_name_resolvable_from_namespace_keda(domain: str) -> None:
    objects = render(merge(VALUE_SETS["keda"], {"clusterDomain": domain}))
    (trigger,) = only(objects, "ScaledObject")["spec"]["triggers"]
    host, _, port = trigger["metadata"]["address"].rpartition(":")
    reached = resolve(host, KEDA_NAMESPACE, services(objects), domain)
    assert reached is not None, f"{host} does not resolve from namespace {KEDA_NAMESPACE}"
    assert service_targets(objects, reached.name) == {"redis"}
    service = only(objects, "Service", "redis")
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert is_fully_qualified(host, domain), "other namespaces get fully qualified names"


def test_keda_reaches_an_external_redis_named_by_a_bare_service_name_of_the_namespace() -> None:
    # REDIS_URL may name a Redis Service of the release's namespace by its bare name: the api
    # and the worker resolve it there, and KEDA must reach the same Service from its own.
    values = {
        **VALUE_SETS["keda"],
        "redis": {"mode": "external"},
        "externalRedis": {"url": "redis://shared-redis:6380/1", "existingSecret": "s"},
    }
    objects = render(values)
    shared = Service("shared-redis", NAMESPACE)
    url_host = urlsplit(settings_of(objects)["REDIS_URL"]).hostname
    assert resolve(str(url_host), NAMESPACE, [shared]) == shared
    (trigger,) = only(objects, "ScaledObject")["spec"]["triggers"]
    host, _, port = trigger["metadata"]["address"].rpartition(":")
    assert resolve(host, KEDA_NAMESPACE, [shared]) == shared
    assert port == "6380"


def test_the_resolver_model_refuses_a_short_name_from_another_namespace() -> None:
    objects = render_set("keda")
    redis = only(objects, "Service", "redis")["metadata"]["name"]
    assert resolve(redis, NAMESPACE, services(objects)) is not None
    assert resolve(redis, KEDA_NAMESPACE, services(objects)) is None
    assert resolve(f"{redis}.{NAMESPACE}", KEDA_NAMESPACE, services(objects)) is not None


def addresses_inside_the_namespace(objects: list[Rendered]) -> list[tuple[str, str, str]]:
    """(consumer, host, component it must reach) for every address a pod of the release dials."""
    wanted: list[tuple[str, str, str]] = []
    data = settings_of(objects)
    redis_host = urlsplit(data["REDIS_URL"]).hostname
    if find(objects, "Service", "redis") and redis_host:
        wanted.append(("api and worker (REDIS_URL)", redis_host, "redis"))
    for workload in objects:
        if workload.kind not in ("Deployment", "Job", "Pod"):
            continue
        env = env_values(workload.manifest)
        for key in ("LOCUST_HOST", "API_URL"):
            if key in env:
                wanted.append((f"{workload} {key}", str(urlsplit(env[key]).hostname), "api"))
        args = pod_spec(workload.manifest)["containers"][0].get("args", [])
        if "--master-host" in args:
            master = args[args.index("--master-host") + 1]
            wanted.append((f"{workload} --master-host", master, "locust-master"))
    return wanted


@pytest.mark.parametrize("value_set", ["defaults", "loadtest", "keda", "monitoring"])
def test_every_address_a_pod_dials_resolves_from_its_namespace_to_the_right_pods(
    value_set: str,
) -> None:
    objects = render_set(value_set)
    wanted = addresses_inside_the_namespace(objects)
    assert wanted, "no address found: the test would check nothing"
    for consumer, host, component in wanted:
        reached = resolve(host, NAMESPACE, services(objects))
        assert reached is not None, f"{consumer}: {host} resolves to no Service"
        assert service_targets(objects, reached.name) == {component}, consumer


def test_prometheus_finds_every_service_monitor_and_each_selects_its_service() -> None:
    prometheus = yaml.safe_load((K8S / "kube-prometheus-stack-values.yaml").read_text())
    spec = prometheus["prometheus"]["prometheusSpec"]
    # false: an empty selector, so ServiceMonitors of every release and namespace are picked.
    assert spec["serviceMonitorSelectorNilUsesHelmValues"] is False
    assert "serviceMonitorNamespaceSelector" not in spec  # empty: every namespace
    objects = render_set("monitoring")
    monitors = find(objects, "ServiceMonitor")
    assert {component_of(m) for m in monitors} == {"api", "worker", "redis"}
    for monitor in monitors:
        # Without spec.namespaceSelector a ServiceMonitor selects Services in its own namespace.
        assert "namespaceSelector" not in monitor.manifest["spec"]
        selector = monitor.manifest["spec"]["selector"]["matchLabels"]
        (service,) = [
            s
            for s in find(objects, "Service")
            if selector.items() <= s.manifest["metadata"]["labels"].items()
        ]
        assert service_targets(objects, service.name) == {component_of(monitor)}


def test_prometheus_adapter_reads_the_lag_scraped_in_the_hpas_own_namespace() -> None:
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["external"]
    # The adapter matches the series' namespace label to the namespace of the HPA asking.
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    values = merge(VALUE_SETS["prometheus-adapter"], VALUE_SETS["monitoring"])
    objects = render(values)
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == rule["name"]["as"]
    # Prometheus labels scraped series with the namespace of the target, which is where the
    # api's ServiceMonitor selects its Service: the HPA's own namespace.
    monitor = only(objects, "ServiceMonitor", "api")
    assert "namespaceSelector" not in monitor["spec"]
    host = urlsplit(adapter["prometheus"]["url"]).hostname
    prometheus_service = Service("kube-prometheus-stack-prometheus", MONITORING_NAMESPACE)
    assert resolve(str(host), MONITORING_NAMESPACE, [prometheus_service]) == prometheus_service


def test_grafanas_sidecar_finds_each_releases_dashboard_under_its_own_file_name() -> None:
    values = yaml.safe_load((K8S / "kube-prometheus-stack-values.yaml").read_text())
    sidecar = values["grafana"]["sidecar"]["dashboards"]
    # The sidecar watches ConfigMaps by label in every namespace ("ALL"), then writes each
    # key as a file of that name into one folder that Grafana reads.
    assert sidecar["searchNamespace"] == "ALL"
    files: dict[str, str] = {}
    for release in ("blue", "green"):
        found = [
            o
            for o in render(release=release)
            if o.kind == "ConfigMap"
            and o.manifest["metadata"]["labels"].get(sidecar["label"]) == sidecar["labelValue"]
        ]
        assert len(found) == 1, f"release {release}: the sidecar finds {len(found)} ConfigMaps"
        for key in found[0].manifest["data"]:
            assert key not in files, f"{release} overwrites {files.get(key)}'s {key}"
            files[key] = release
    assert set(files.values()) == {"blue", "green"}


# -- NetworkPolicy -----------------------------------------------------------------------


def pods_of(objects: list[Rendered]) -> dict[str, Pod]:
    """Each component's pod as NetworkPolicy sees it."""
    pods: dict[str, Pod] = {}
    for workload in objects:
        if workload.kind not in ("Deployment", "StatefulSet", "Job", "Pod"):
            continue
        manifest = workload.manifest
        labels = (
            manifest["metadata"]["labels"]
            if workload.kind == "Pod"
            else manifest["spec"]["template"]["metadata"]["labels"]
        )
        ports = {
            p["name"]: p["containerPort"]
            for c in pod_spec(manifest)["containers"]
            for p in c.get("ports", [])
        }
        pods[component_of(workload)] = Pod(NAMESPACE, labels, ports)
    return pods


def service_port(objects: list[Rendered], component: str, name: str) -> int:
    """The container port a Service's named port leads to."""
    service = only(objects, "Service", component)
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == name]
    target = port["targetPort"]
    pod = pods_of(objects)[component]
    return pod.ports[target] if isinstance(target, str) else int(target)


NETWORK_POLICY_SETS: dict[str, Values] = {
    "plain": {"networkPolicy": {"enabled": True}},
    "keda": merge(VALUE_SETS["keda"], {"networkPolicy": {"enabled": True}}),
    "loadtest-monitoring": merge(
        merge(VALUE_SETS["loadtest"], VALUE_SETS["monitoring"]),
        {"networkPolicy": {"enabled": True}},
    ),
}


@pytest.mark.parametrize("value_set", NETWORK_POLICY_SETS)
def test_every_declared_consumer_gets_in_and_nobody_else_reaches_redis(value_set: str) -> None:
    objects = render(NETWORK_POLICY_SETS[value_set])
    policies = [o.manifest for o in find(objects, "NetworkPolicy")]
    assert policies, "networkPolicy.enabled rendered no policy"
    pods = pods_of(objects)
    redis_port = service_port(objects, "redis", "redis")
    api_port = service_port(objects, "api", "http")
    keda_scales = bool(find(objects, "ScaledObject"))

    needs: list[tuple[str, Pod, str, int]] = [
        ("api", pods["api"], "redis", redis_port),
        ("worker", pods["worker"], "redis", redis_port),
        ("helm test pod", pods["test"], "api", api_port),
    ]
    if keda_scales:
        needs.append(("KEDA's operator", KEDA_OPERATOR, "redis", redis_port))
    for component in ("locust-master", "locust-worker", "locust-job"):
        if component in pods:
            needs.append((component, pods[component], "api", api_port))
    for monitor in find(objects, "ServiceMonitor"):
        for endpoint in monitor.manifest["spec"]["endpoints"]:
            target = component_of(monitor)
            needs.append(
                ("Prometheus", PROMETHEUS, target, service_port(objects, target, endpoint["port"]))
            )
    for consumer, source, target, port in needs:
        assert admits(policies, source, pods[target], port), (
            f"{consumer} cannot reach {target}:{port}"
        )

    strangers = [
        ("another pod in the namespace", Pod(NAMESPACE, {"app": "other"})),
        ("the helm test pod", pods["test"]),
        ("Prometheus", PROMETHEUS),
        (
            "a pod in another namespace",
            Pod("elsewhere", {"app.kubernetes.io/name": "keda-operator"}),
        ),
    ]
    if not keda_scales:
        strangers.append(("KEDA's operator when KEDA does not scale the worker", KEDA_OPERATOR))
    strangers += [
        (c, pods[c]) for c in ("locust-master", "locust-worker", "locust-job") if c in pods
    ]
    for who, source in strangers:
        assert not admits(policies, source, pods["redis"], redis_port), f"{who} reaches Redis"


# -- rollouts ----------------------------------------------------------------------------


def referenced(manifest: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret a pod reads, by env or by volume."""
    spec = pod_spec(manifest)
    found: set[tuple[str, str]] = set()
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                found.add(("ConfigMap", source["configMapRef"]["name"]))
            if "secretRef" in source:
                found.add(("Secret", source["secretRef"]["name"]))
        for item in container.get("env", []):
            ref = item.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                found.add(("ConfigMap", ref["configMapKeyRef"]["name"]))
            if "secretKeyRef" in ref:
                found.add(("Secret", ref["secretKeyRef"]["name"]))
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            found.add(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume:
            found.add(("Secret", volume["secret"]["secretName"]))
    return found


def render_fresh(values: Values, chart_dir: Path, edit: tuple[str, str] | None) -> list[Rendered]:
    """Render a copy of the chart, uncached, optionally with text appended to one of its files."""
    import helm_python

    copy = chart_dir / CHART.name
    shutil.copytree(CHART, copy, symlinks=False)
    if edit is not None:
        with (copy / edit[0]).open("a") as changed:
            changed.write(edit[1])
    files = helm_python.Chart.load(copy).render(
        anonymous_unless_keyed(values), name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    objects: list[Rendered] = []
    for source, rendered in sorted(files.items()):
        if source.endswith(".yaml"):
            objects += [Rendered(source, d) for d in load_all(rendered) if d]
    return objects


# How each object a pod reads changes: new values, an edit to a file of the chart, or (the
# generated password) nothing at all, since it is new on every render without a cluster.
CHANGES: dict[tuple[str, str], Values | tuple[str, str] | None] = {
    ("ConfigMap", "config"): {"config": {"logLevel": "DEBUG"}},
    ("ConfigMap", "redis"): {"redis": {"appendfsync": "always"}},
    ("ConfigMap", "locust"): ("files/locustfile.py", "\n# changed\n"),
    ("ConfigMap", "redis-scripts"): ("files/redis/start-node.sh", "\n# changed\n"),
    ("Secret", "redis"): None,
}

ROLLED_KINDS = ("Deployment", "StatefulSet")


def templates(objects: list[Rendered]) -> dict[str, str]:
    return {
        o.name: json.dumps(o.manifest["spec"]["template"], sort_keys=True)
        for o in objects
        if o.kind in ROLLED_KINDS
    }


@pytest.mark.parametrize("value_set", ["defaults", "loadtest", "keda"])
def test_every_configmap_and_secret_a_pod_reads_rolls_the_pod_when_it_changes(
    value_set: str, tmp_path: Path
) -> None:
    base_values = VALUE_SETS[value_set]
    objects = render_fresh(base_values, tmp_path / "before", None)
    rendered = {(o.kind, o.name): o for o in objects if o.kind in ("ConfigMap", "Secret")}
    checked = 0
    for workload in [o for o in objects if o.kind in ROLLED_KINDS]:
        for kind, name in sorted(referenced(workload.manifest)):
            if (kind, name) not in rendered:
                continue  # a Secret the user brings: test_upgrade shows how it rolls
            key = (kind, component_of(rendered[kind, name]))
            assert key in CHANGES, f"{workload} reads {kind}/{name}: say how it changes"
            change = CHANGES[key]
            where = tmp_path / f"{workload.name}-{kind}-{name}"
            if isinstance(change, dict):
                after = render_fresh(merge(base_values, change), where, None)
            else:
                after = render_fresh(base_values, where, change)
            changed = {(o.kind, o.name): o.manifest for o in after}
            assert changed[kind, name] != rendered[kind, name].manifest, f"{name} is unchanged"
            assert templates(after)[workload.name] != templates(objects)[workload.name], (
                f"{workload} does not roll when {kind}/{name} changes"
            )
            checked += 1
    assert checked >= 3


# -- limits ------------------------------------------------------------------------------


def redis_conf(objects: list[Rendered]) -> dict[str, str]:
    conf = only(objects, "ConfigMap", "redis")["data"]["redis.conf"]
    return dict(
        line.split(" ", 1) for line in conf.splitlines() if line and not line.startswith("#")
    )


def quantity_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    scale = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(float(number) * scale[unit])


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"redis": {"resources": {"limits": {"memory": "2Gi"}}}},
        {"redis": {"maxmemory": "100mb"}},
    ],
)
def test_redis_refuses_writes_before_its_container_reaches_the_memory_limit(values: Values) -> None:
    objects = render(values)
    conf = redis_conf(objects)
    assert conf["maxmemory-policy"] == "noeviction"
    maxmemory = int(conf["maxmemory"])
    (redis,) = pod_spec(only(objects, "StatefulSet", "redis"))["containers"]
    limit = quantity_bytes(redis["resources"]["limits"]["memory"])
    assert 0 < maxmemory < limit


# The setting each long-running process drains by after SIGTERM; Locust has nothing to drain.
DRAIN_SETTING = {"api": "DRAIN_TIMEOUT", "worker": "SHUTDOWN_GRACE"}
UNDRAINED = {"locust-master", "locust-worker"}


def pre_stop_seconds(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    command = hook["exec"]["command"]
    known = (["sleep"], ["python", "-m", "fastapi_redis_mini.api.drain"])
    assert command[:-1] in known, f"a preStop hook the test cannot time: {command}"
    return float(command[-1])


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_deployment_gets_longer_to_stop_than_its_pause_and_drain(value_set: str) -> None:
    objects = render_set(value_set)
    settings = settings_of(objects)
    for deployment in find(objects, "Deployment"):
        component = component_of(deployment)
        if component in UNDRAINED:
            continue
        assert component in DRAIN_SETTING, f"{deployment}: which setting is its drain?"
        spec = pod_spec(deployment.manifest)
        (container,) = spec["containers"]
        drain = float(settings[DRAIN_SETTING[component]])
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace > pre_stop_seconds(container) + drain, str(deployment)


def test_the_api_pauses_before_it_drains_so_its_endpoints_go_first() -> None:
    api = only(render_set("defaults"), "Deployment", "api")
    (container,) = pod_spec(api)["containers"]
    assert pre_stop_seconds(container) > 0


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_task_outlives_the_workers_drain(value_set: str) -> None:
    settings = settings_of(render_set(value_set))
    assert float(settings["MAX_TASK_DURATION"]) <= float(settings["TASK_TIMEOUT"])
    assert float(settings["TASK_TIMEOUT"]) <= float(settings["SHUTDOWN_GRACE"])
