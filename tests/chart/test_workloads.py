"""What each component of the chart renders: api, worker, Redis, autoscaling, settings."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
import yaml

from fastapi_redis_mini.core.settings import Settings

from .helm import (
    CHART,
    EXTERNAL_REDIS_URL,
    VALUE_SETS,
    Manifest,
    RenderError,
    find,
    only,
    pod_spec,
    render,
    render_notes,
    render_set,
)

SETTINGS_FIELDS = set(Settings.model_fields)


def config_data(objects: list[Any]) -> dict[str, str]:
    for obj in find(objects, "ConfigMap", "config"):
        data: dict[str, str] = obj.manifest["data"]
        return data
    raise AssertionError("no settings ConfigMap")


def container(manifest: Manifest) -> dict[str, Any]:
    first: dict[str, Any] = pod_spec(manifest)["containers"][0]
    return first


def env_of(manifest: Manifest) -> dict[str, Any]:
    return {e["name"]: e for e in container(manifest).get("env", [])}


def camel(env_name: str) -> str:
    head, *rest = env_name.lower().split("_")
    return head + "".join(part.capitalize() for part in rest)


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_configmap_key_is_a_setting_the_code_reads(value_set: str) -> None:
    unknown = {
        key for key in config_data(render_set(value_set)) if key.lower() not in SETTINGS_FIELDS
    }
    assert unknown == set()


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_code_accepts_every_rendered_setting(
    value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = config_data(render_set(value_set))
    for key, value in {**data, "REDIS_PASSWORD": "from-the-secret"}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.queue_key == data["QUEUE_KEY"]
    assert settings.max_concurrency == int(data["MAX_CONCURRENCY"])


def test_each_setting_comes_from_the_value_of_its_camel_case_name() -> None:
    overrides: dict[str, dict[str, Any]] = {
        "config": {"keyPrefix": "t1:", "cacheTtl": 11, "logLevel": "DEBUG"},
        "api": {"webConcurrency": 3, "maxBacklog": 1234567},
        "worker": {"maxConcurrency": 17, "retryBackoff": 0.25, "shutdownGrace": 31},
    }
    data = config_data(render(overrides))
    groups = [overrides["config"], overrides["api"], overrides["worker"]]
    for group in groups:
        for name, value in group.items():
            env = next(key for key in data if camel(key) == name)
            assert data[env] == str(value), env
    # From redis.mode and where Redis is; API_METRICS_PORT from api.metricsPort, named as the
    # worker's metricsPort is; CONSOLE_ENABLED from api.console.enabled, beside its key's Secret.
    derived = {"REDIS_URL", "REDIS_CLUSTER", "HOST", "API_METRICS_PORT", "CONSOLE_ENABLED"}
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in set(data) - derived:
        if key.startswith("OTEL_"):  # otel.<name> becomes OTEL_<NAME>
            assert camel(key.removeprefix("OTEL_")) in defaults["otel"], key
            continue
        assert any(camel(key) in defaults[group] for group in ("config", "api", "worker")), key


def test_large_whole_numbers_render_as_integers_not_floats() -> None:
    data = config_data(render({"api": {"maxBacklog": 10_000_000}}))
    assert data["MAX_BACKLOG"] == "10000000"


@pytest.mark.parametrize("component", ["api", "worker"])
def test_api_and_worker_take_settings_from_the_configmap_and_the_password_from_a_secret(
    component: str,
) -> None:
    objects = render_set("defaults")
    deployment = only(objects, "Deployment", component)
    (config,) = find(objects, "ConfigMap", "config")
    assert container(deployment)["envFrom"] == [{"configMapRef": {"name": config.name}}]
    password = env_of(deployment)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    secret = only(objects, "Secret", "redis")
    # The service user's password (redis.acl), not the default user's.
    assert password == {"name": secret["metadata"]["name"], "key": "service-password"}


def test_pods_roll_when_their_settings_change() -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = only(render(values), "Deployment", "worker")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) != checksum({"worker": {"maxConcurrency": 9}})


def test_api_keys_come_from_an_existing_secret_and_only_the_api_sees_them() -> None:
    objects = render_set("monitoring")
    api_env = env_of(only(objects, "Deployment", "api"))
    assert api_env["API_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": "api-keys",
        "key": "api-keys",
    }
    assert "API_KEYS" not in env_of(only(objects, "Deployment", "worker"))
    assert "API_KEYS" not in config_data(objects)
    assert "API_KEYS" not in env_of(only(render_set("defaults"), "Deployment", "api"))


def test_the_console_takes_its_admin_key_from_a_secret_and_only_the_api_sees_it() -> None:
    objects = render_set("console")
    api_env = env_of(only(objects, "Deployment", "api"))
    assert api_env["ADMIN_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "admin",
        "key": "admin-api-key",
    }
    assert config_data(objects)["CONSOLE_ENABLED"] == "true"
    assert "ADMIN_API_KEY" not in env_of(only(objects, "Deployment", "worker"))
    assert "ADMIN_API_KEY" not in config_data(objects)
    defaults = render_set("defaults")
    assert "ADMIN_API_KEY" not in env_of(only(defaults, "Deployment", "api"))
    assert config_data(defaults)["CONSOLE_ENABLED"] == "false"


SECRET_SETTINGS = {
    "api": {
        "apiKeys": {"existingSecret": "api-keys"},
        "tenantSecret": {"existingSecret": "tenant", "secretKey": "hmac"},
        "priorityHighKeys": {"existingSecret": "lanes", "secretKey": "high"},
    },
    "config": {"webhookSecret": {"existingSecret": "hooks", "secretKey": "signing"}},
}


@pytest.mark.parametrize(
    ("variable", "reference", "readers"),
    [
        ("TENANT_SECRET", {"name": "tenant", "key": "hmac"}, {"api"}),
        ("PRIORITY_HIGH_KEYS", {"name": "lanes", "key": "high"}, {"api"}),
        ("WEBHOOK_SECRET", {"name": "hooks", "key": "signing"}, {"api", "worker"}),
    ],
)
def test_secret_settings_come_from_their_secret_to_the_processes_that_read_them(
    variable: str, reference: dict[str, str], readers: set[str]
) -> None:
    objects = render(SECRET_SETTINGS)
    assert variable not in config_data(objects)
    for component in ("api", "worker"):
        env = env_of(only(objects, "Deployment", component))
        if component in readers:
            assert env[variable]["valueFrom"]["secretKeyRef"] == reference
        else:
            assert variable not in env
    for component in ("api", "worker"):
        assert variable not in env_of(only(render_set("defaults"), "Deployment", component))


def test_per_key_webhook_secrets_reach_the_api_and_the_worker_and_the_worker_gets_tenants() -> None:
    values = {
        **SECRET_SETTINGS,
        "config": {"webhookKeySecrets": {"existingSecret": "key-hooks", "secretKey": "pairs"}},
    }
    objects = render(values)
    assert "WEBHOOK_KEY_SECRETS" not in config_data(objects)
    for component in ("api", "worker"):
        deployment = only(objects, "Deployment", component)
        env = env_of(deployment)
        assert env["WEBHOOK_KEY_SECRETS"]["valueFrom"]["secretKeyRef"] == {
            "name": "key-hooks", "key": "pairs",
        }  # fmt: skip
        # The worker finds a task's key by its tenant, derived with the api's TENANT_SECRET.
        assert env["TENANT_SECRET"]["valueFrom"]["secretKeyRef"] == {
            "name": "tenant",
            "key": "hmac",
        }
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert {"checksum/webhook-key-secrets", "checksum/tenant-secret"} <= set(annotations)
    with pytest.raises(
        RenderError, match=r"config.webhookKeySecrets.existingSecret needs api.apiKeys"
    ):
        render({"config": {"webhookKeySecrets": {"existingSecret": "key-hooks"}}})


def test_high_lane_keys_without_api_keys_are_refused() -> None:
    with pytest.raises(RenderError, match=r"api.priorityHighKeys.existingSecret needs api.apiKeys"):
        render({"api": {"priorityHighKeys": {"existingSecret": "lanes"}}})


def test_the_code_accepts_the_webhook_hosts_and_scheduling_settings_the_chart_renders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {
        "config": {"webhookAllowedHosts": ["10.0.0.0/8", "hooks.internal"], "recentTasks": 0},
        "worker": {"webhookMaxAttempts": 7, "webhookTimeout": 2.5},
        "api": {"maxHeaders": 50, "headerTimeout": 5},
    }
    for key, value in {**config_data(render(values)), "REDIS_PASSWORD": "p"}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.webhook_allowed_hosts == ("10.0.0.0/8", "hooks.internal")
    assert settings.recent_tasks == 0
    assert (settings.webhook_max_attempts, settings.webhook_timeout) == (7, 2.5)
    assert (settings.max_headers, settings.header_timeout) == (50, 5)


# -- api and worker ----------------------------------------------------------------------


def test_api_serves_on_its_port_behind_a_service_with_health_and_readiness_probes() -> None:
    objects = render_set("defaults")
    api = container(only(objects, "Deployment", "api"))
    assert api["command"] == ["python", "-m", "fastapi_redis_mini.api"]
    assert api["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9101, "protocol": "TCP"},
    ]
    assert config_data(objects)["API_METRICS_PORT"] == "9101"
    assert config_data(objects)["PORT"] == "8000"
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = only(objects, "Service", "api")
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_worker_serves_metrics_and_probes_on_its_metrics_port() -> None:
    objects = render_set("defaults")
    worker = container(only(objects, "Deployment", "worker"))
    assert worker["command"] == ["python", "-m", "fastapi_redis_mini.worker"]
    assert worker["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    assert config_data(objects)["METRICS_PORT"] == "9100"
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_worker_gets_longer_to_stop_than_it_takes_to_drain(value_set: str) -> None:
    objects = render_set(value_set)
    grace = pod_spec(only(objects, "Deployment", "worker"))["terminationGracePeriodSeconds"]
    assert grace > float(config_data(objects)["SHUTDOWN_GRACE"])


def test_ingress_routes_to_the_api_service_only_when_enabled() -> None:
    assert find(render_set("defaults"), "Ingress") == []
    objects = render_set("ingress-networkpolicy")
    ingress = only(objects, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = only(objects, "Service", "api")
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}


# -- Redis -------------------------------------------------------------------------------


# The first releases of each line with the fixes for the Lua CVEs of October 2025
# (CVE-2025-49844, CVE-2025-46817, CVE-2025-46818, CVE-2025-46819).
PATCHED_REDIS = {(7, 2): (7, 2, 11), (7, 4): (7, 4, 6), (8, 0): (8, 0, 4), (8, 2): (8, 2, 2)}


def test_redis_is_the_official_image_pinned_to_a_release_with_the_lua_fixes() -> None:
    redis = container(only(render_set("defaults"), "StatefulSet", "redis"))
    repository, _, tag = redis["image"].partition(":")
    assert repository == "redis"
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(-[a-z0-9]+)?", tag)
    assert match, f"pin a full version, never latest: {tag}"
    major, minor, patch = (int(part) for part in match.groups()[:3])
    version = (major, minor, patch)
    floor = PATCHED_REDIS.get((major, minor))
    assert floor is not None, f"{tag}: a line without known Lua fixes; add its first fixed release"
    assert version >= floor, f"{tag} predates {floor}, the first of its line with the Lua fixes"


def test_redis_keeps_the_queue_durable_and_never_evicts_it() -> None:
    objects = render_set("defaults")
    conf = only(objects, "ConfigMap", "redis")["data"]["redis.conf"].splitlines()
    assert "appendonly yes" in conf
    assert "appendfsync everysec" in conf
    assert "maxmemory-policy noeviction" in conf


def test_redis_takes_its_password_from_the_secret_but_not_on_the_command_line() -> None:
    redis = container(only(render_set("defaults"), "StatefulSet", "redis"))
    assert redis["command"] == ["sh", "/scripts/start-node.sh"]
    script = (CHART / "files" / "redis" / "start-node.sh").read_text()
    assert 'requirepass "%s"' in script
    assert '"$REDIS_PASSWORD"' in script
    assert "--requirepass" not in script
    assert "secretKeyRef" in redis["env"][0]["valueFrom"]


def test_redis_probes_ping_with_the_password() -> None:
    redis = container(only(render_set("defaults"), "StatefulSet", "redis"))
    assert "REDISCLI_AUTH" in {e["name"] for e in redis["env"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert "redis-cli" in " ".join(redis[probe]["exec"]["command"])
        assert "ping" in " ".join(redis[probe]["exec"]["command"])


def test_redis_runs_behind_a_headless_service_that_governs_the_statefulset() -> None:
    objects = render_set("defaults")
    service = only(objects, "Service", "redis")
    statefulset = only(objects, "StatefulSet", "redis")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    host = service["metadata"]["name"]
    assert config_data(objects)["REDIS_URL"] == f"redis://fastapi-redis-mini@{host}:6379/0"


def test_redis_data_lives_on_a_claim_unless_persistence_is_off() -> None:
    persistent = only(render_set("defaults"), "StatefulSet", "redis")
    (claim,) = persistent["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "data" not in {v["name"] for v in pod_spec(persistent)["volumes"]}

    ephemeral = only(render_set("persistence-off"), "StatefulSet", "redis")
    assert "volumeClaimTemplates" not in ephemeral["spec"]
    volumes = {v["name"]: v for v in pod_spec(ephemeral)["volumes"]}
    assert "emptyDir" in volumes["data"]


def test_generated_redis_password_is_random_and_survives_uninstall() -> None:
    secret = only(render_set("defaults"), "Secret", "redis")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert len(password) == 32
    assert password.isalnum()
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_an_existing_redis_secret_replaces_the_generated_one() -> None:
    objects = render(
        {
            "redis": {
                "auth": {"existingSecret": "my-redis", "existingSecretPasswordKey": "pw"},
                "acl": {"passwordKey": "service-pw"},
            }
        }
    )
    assert find(objects, "Secret") == []
    reference = env_of(only(objects, "Deployment", "worker"))["REDIS_PASSWORD"]["valueFrom"]
    assert reference["secretKeyRef"] == {"name": "my-redis", "key": "service-pw"}
    redis = {e["name"]: e for e in container(only(objects, "StatefulSet", "redis"))["env"]}
    assert redis["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "pw"}


def test_external_redis_replaces_the_statefulset() -> None:
    objects = render_set("external-redis")
    assert find(objects, "StatefulSet") == []
    assert find(objects, "Secret") == []
    assert find(objects, "Service", "redis") == []
    assert config_data(objects)["REDIS_URL"] == EXTERNAL_REDIS_URL
    reference = env_of(only(objects, "Deployment", "api"))["REDIS_PASSWORD"]["valueFrom"]
    assert reference["secretKeyRef"] == {"name": "managed-redis", "key": "redis-password"}


# -- autoscaling -------------------------------------------------------------------------


def _lag_trigger(objects: list[Any]) -> dict[str, Any]:
    (trigger,) = only(objects, "ScaledObject")["spec"]["triggers"]
    assert isinstance(trigger, dict)
    return trigger


def test_keda_scales_the_worker_on_the_consumer_groups_lag() -> None:
    objects = render_set("keda")
    assert find(objects, "HorizontalPodAutoscaler") == []
    scaled = only(objects, "ScaledObject")
    worker = only(objects, "Deployment", "worker")
    assert scaled["spec"]["scaleTargetRef"] == {"name": worker["metadata"]["name"]}
    assert "replicas" not in worker["spec"], "the autoscaler owns the replica count"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 10)
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 120
    trigger = _lag_trigger(objects)
    data = config_data(objects)
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["lagCount"] == "20"
    assert "pendingEntriesCount" not in trigger["metadata"]
    assert trigger["metadata"]["consumerGroup"] == data["CONSUMER_GROUP"]
    assert trigger["metadata"]["stream"] == data["KEY_PREFIX"] + data["QUEUE_KEY"]
    # Where the address leads is test_cluster_semantics' job: it resolves from namespace keda.


def test_keda_authenticates_to_redis_with_the_same_secret_as_the_worker() -> None:
    objects = render_set("keda")
    auth = only(objects, "TriggerAuthentication")
    assert _lag_trigger(objects)["authenticationRef"] == {"name": auth["metadata"]["name"]}
    (ref,) = auth["spec"]["secretTargetRef"]
    worker_ref = env_of(only(objects, "Deployment", "worker"))["REDIS_PASSWORD"]["valueFrom"][
        "secretKeyRef"
    ]
    assert {"name": ref["name"], "key": ref["key"]} == worker_ref
    assert ref["parameter"] == "password"


def test_keda_reads_address_tls_and_database_from_an_external_redis_url() -> None:
    values = {**VALUE_SETS["external-redis"], **VALUE_SETS["keda"]}
    metadata = _lag_trigger(render(values))["metadata"]
    assert metadata["address"] == "redis.example.internal:6380"
    assert metadata["enableTLS"] == "true"
    assert metadata["databaseIndex"] == "2"


def test_keda_stream_name_follows_the_key_prefix() -> None:
    values = {"config": {"keyPrefix": "blue:"}, **VALUE_SETS["keda"]}
    assert _lag_trigger(render(values))["metadata"]["stream"] == "blue:task_stream"


def test_without_keda_prometheus_adapter_serves_the_lag_as_an_external_metric() -> None:
    objects = render_set("prometheus-adapter")
    assert find(objects, "ScaledObject") == []
    hpa = only(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "fastapi_redis_mini_stream_lag"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {
        "release": "demo",
        "stream": "task_stream",
        "group": "workers",
    }
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "20"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120


def test_cpu_is_the_last_resort_autoscaler() -> None:
    hpa = only(render_set("defaults"), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 10)


def test_autoscaling_off_gives_a_fixed_replica_count() -> None:
    objects = render({"worker": {"autoscaling": {"enabled": False}, "replicaCount": 3}})
    assert find(objects, "HorizontalPodAutoscaler") == []
    assert find(objects, "ScaledObject") == []
    assert only(objects, "Deployment", "worker")["spec"]["replicas"] == 3


# -- observability -----------------------------------------------------------------------


def test_grafana_dashboards_ship_in_a_configmap_the_sidecar_picks_up() -> None:
    dashboards = only(render_set("defaults"), "ConfigMap", "metrics")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = {p.name: p.read_text() for p in (CHART / "files" / "grafana").glob("*.json")}
    assert shipped, "no dashboard under files/grafana"
    by_file = {
        next(name for name in shipped if key.endswith("-" + name)): text
        for key, text in dashboards["data"].items()
    }
    assert {k: v.rstrip("\n") for k, v in by_file.items()} == {
        k: v.rstrip("\n") for k, v in shipped.items()
    }


def test_two_releases_give_the_grafana_sidecar_different_dashboard_files() -> None:
    # The sidecar writes each key of every labelled ConfigMap, from every namespace, as a file
    # of that name into one folder: equal keys overwrite each other, and deleting one release
    # deletes the other's dashboard.
    keys = []
    for release in ("blue", "green"):
        (dashboards,) = [
            o
            for o in render(release=release)
            if "grafana_dashboard" in o.manifest["metadata"]["labels"]
        ]
        keys.append(set(dashboards.manifest["data"]))
    assert all(keys), "a release shipped no dashboard"
    assert keys[0].isdisjoint(keys[1])


def test_service_monitors_scrape_api_and_worker_with_the_prometheus_selector_labels() -> None:
    objects = render_set("monitoring")
    monitors = find(objects, "ServiceMonitor")
    assert sorted(
        m.manifest["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors
    ) == [
        "api",
        "redis",
        "worker",
    ]
    for monitor in monitors:
        spec = monitor.manifest["spec"]
        assert monitor.manifest["metadata"]["labels"]["release"] == "kps"
        (service,) = [
            s
            for s in find(objects, "Service")
            if spec["selector"]["matchLabels"].items() <= s.manifest["metadata"]["labels"].items()
        ]
        (endpoint,) = spec["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service.manifest["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert {
            "sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_instance"],
            "targetLabel": "release",
        } in endpoint["relabelings"]


def test_prometheus_rule_carries_the_rules_file_unchanged() -> None:
    rule = only(render_set("monitoring"), "PrometheusRule")
    shipped = yaml.safe_load((CHART / "files" / "prometheus" / "rules.yaml").read_text())
    # First the release's thresholds, then the file's groups as they are.
    config, *groups = rule["spec"]["groups"]
    assert config["name"] == "fastapi-redis-mini.config"
    assert groups == shipped["groups"]
    assert find(render_set("defaults"), "PrometheusRule") == []


# -- load and helm test ------------------------------------------------------------------


def test_locust_runs_the_repos_locustfile_against_the_api_service() -> None:
    objects = render_set("loadtest")
    locustfile = (CHART.parents[1] / "loadtest" / "locustfile.py").read_text()
    configmap = only(objects, "ConfigMap", "locust")
    assert configmap["data"]["locustfile.py"].rstrip("\n") == locustfile.rstrip("\n")
    api_service = only(objects, "Service", "api")["metadata"]["name"]
    for component in ("locust-master", "locust-worker", "locust-job"):
        kind = "Job" if component == "locust-job" else "Deployment"
        env = env_of(only(objects, kind, component))
        assert env["LOCUST_HOST"]["value"] == f"http://{api_service}:8000"
        assert env["LOCUST_LOCUSTFILE"]["value"] == "/loadtest/locustfile.py"
    master_service = only(objects, "Service", "locust-master")
    assert {"name": "web", "port": 8089, "targetPort": "web", "protocol": "TCP"} in (
        master_service["spec"]["ports"]
    )
    worker_args = container(only(objects, "Deployment", "locust-worker"))["args"]
    assert worker_args == ["--worker", "--master-host", master_service["metadata"]["name"]]
    assert "--headless" in container(only(objects, "Job", "locust-job"))["args"]


def test_locust_sends_an_api_key_from_a_secret_when_given_one() -> None:
    values = {"loadtest": {"enabled": True, "apiKey": {"existingSecret": "load-key"}}}
    env = env_of(only(render(values), "Deployment", "locust-worker"))
    assert env["LOCUST_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "load-key",
        "key": "api-key",
    }
    assert "LOCUST_API_KEY" not in env_of(
        only(render_set("loadtest"), "Deployment", "locust-worker")
    )


def test_no_load_is_generated_unless_asked() -> None:
    assert [o for o in render_set("defaults") if "locust" in o.name] == []


def test_helm_test_submits_a_task_through_the_api_service_and_waits_for_done() -> None:
    objects = render_set("defaults")
    (pod,) = [o.manifest for o in objects if o.kind == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    test = container(pod)
    assert test["image"] == container(only(objects, "Deployment", "api"))["image"]
    script = test["command"][-1]
    assert '"POST", "/tasks"' in script
    assert "DONE" in script
    api_service = only(objects, "Service", "api")["metadata"]["name"]
    assert env_of(pod)["API_URL"]["value"] == f"http://{api_service}:8000"


def test_notes_tell_the_next_commands() -> None:
    notes = render_notes(VALUE_SETS["loadtest"])
    assert "helm test demo -n tasks" in notes
    assert "port-forward svc/demo-fastapi-redis-mini-api 8000:8000" in notes
    assert "port-forward svc/demo-fastapi-redis-mini-locust-master 8089:8089" in notes


def test_the_dashboards_scaling_panel_finds_the_charts_worker_and_its_autoscaler() -> None:
    release = "frm"
    dashboard = (CHART / "files" / "grafana" / "overview.json").read_text()
    for values, autoscaler in (
        (VALUE_SETS["keda"], "ScaledObject"),
        ({}, "HorizontalPodAutoscaler"),
    ):
        objects = render(values, release=release)
        worker = only(objects, "Deployment", "worker")["metadata"]["name"]
        scaled = only(objects, autoscaler)["metadata"]["name"]
        # KEDA names the HPA it creates keda-hpa-<ScaledObject>.
        hpa = f"keda-hpa-{scaled}" if autoscaler == "ScaledObject" else scaled
        for label, name in (("deployment", worker), ("horizontalpodautoscaler", hpa)):
            patterns = set(re.findall(label + r'=~\\"([^"\\]+)\\"', dashboard))
            assert patterns, f"the dashboard selects no {label}"
            for pattern in patterns:
                assert re.fullmatch(pattern.replace("$release", release), name), (pattern, name)


def test_the_headless_locust_run_is_a_hook_that_replaces_the_last_run() -> None:
    # A Job's template is immutable and its TTL deletes it: as a release resource it could
    # not run again with new values, and `--reuse-values` would bring back a finished run.
    (job,) = find(render_set("loadtest"), "Job")
    annotations = job.manifest["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"].split(",")
    assert job.is_hook


def test_the_locust_run_waits_until_the_api_reads_from_redis() -> None:
    import itertools
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    (job,) = find(render_set("loadtest"), "Job")
    assert job.manifest["metadata"]["annotations"]["helm.sh/hook-weight"] == "10"
    (wait,) = pod_spec(job.manifest)["initContainers"]
    assert wait["command"][:2] == ["python", "-c"]
    # A cluster still being created: the api answers 503 twice, then 404 for the unknown id.
    answers = itertools.chain([503, 503], itertools.repeat(404))
    asked: list[str] = []

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(next(answers))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        result = subprocess.run(
            [sys.executable, "-c", wait["command"][2]],
            env={"LOCUST_HOST": f"http://{host!s}:{port}"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert result.returncode == 0, result.stderr
    assert asked == ["/tasks/" + "0" * 32] * 3


def test_notes_warn_when_the_lag_the_worker_scales_on_is_not_scraped() -> None:
    warning = "metrics.serviceMonitor.enabled\n  is false"
    scaled_on_prometheus = VALUE_SETS["redis-cluster-keda-networkpolicy"]
    assert warning in render_notes(scaled_on_prometheus)
    assert warning in render_notes(VALUE_SETS["prometheus-adapter"])
    from .test_values import merge

    scraped = merge(scaled_on_prometheus, {"metrics": {"serviceMonitor": {"enabled": True}}})
    assert warning not in render_notes(scraped)
    assert warning not in render_notes(VALUE_SETS["keda"])  # one partition: KEDA reads Redis
