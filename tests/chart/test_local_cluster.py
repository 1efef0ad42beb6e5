"""skaffold.yaml, kind-config.yaml, k8s/ and mk/k8s.mk agree with the repo and the chart.

None of kind, skaffold or a cluster exist here, so these read the files and run the make
targets against stand-in tools that only record how they were called.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import kube_schema
from .helm import CHART, REPO, default_values, render, render_set

SKAFFOLD = REPO / "skaffold.yaml"
KIND_CONFIG = REPO / "kind-config.yaml"
K8S = REPO / "k8s"
MAKEFILE = REPO / "mk" / "k8s.mk"
CURRENT_SKAFFOLD_SCHEMAS = {"skaffold/v4beta13", "skaffold/v4beta14"}
MAKE_TARGETS = ["cluster-up", "cluster-down", "dev", "deploy", "loadtest-ui", "grafana", "smoke"]
K8S_TOOLS = ["kind", "helm", "kubectl", "skaffold", "docker"]


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def has_value(path: str) -> bool:
    node: Any = default_values()
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def dockerfile_targets(dockerfile: Path) -> set[str]:
    pattern = re.compile(r"^FROM\s+\S+\s+AS\s+(\S+)", re.IGNORECASE | re.MULTILINE)
    return set(pattern.findall(dockerfile.read_text()))


# -- skaffold ----------------------------------------------------------------------------


def test_skaffold_uses_the_current_schema() -> None:
    config = load(SKAFFOLD)
    assert config["apiVersion"] in CURRENT_SKAFFOLD_SCHEMAS
    assert config["kind"] == "Config"


def test_skaffold_builds_api_and_worker_from_targets_of_the_services_dockerfile() -> None:
    artifacts = load(SKAFFOLD)["build"]["artifacts"]
    built = {}
    for artifact in artifacts:
        context = REPO / artifact["context"]
        dockerfile = context / artifact["docker"]["dockerfile"]
        assert dockerfile.is_file(), f"{artifact['image']}: {dockerfile} does not exist"
        assert artifact["docker"]["target"] in dockerfile_targets(dockerfile)
        built[artifact["docker"]["target"]] = artifact["image"]
    assert built == {"api": "fastapi-redis-mini-api", "worker": "fastapi-redis-mini-worker"}
    values = default_values()
    assert values["api"]["image"]["repository"] == built["api"]
    assert values["worker"]["image"]["repository"] == built["worker"]


def test_skaffold_loads_images_into_kind_instead_of_pushing() -> None:
    assert load(SKAFFOLD)["build"]["local"]["push"] is False


def test_skaffold_deploys_the_chart_with_image_values_that_exist() -> None:
    config = load(SKAFFOLD)
    (release,) = config["deploy"]["helm"]["releases"]
    assert (REPO / release["chartPath"]).resolve() == CHART
    templates = release["setValueTemplates"]
    for key in [*templates, *release.get("setValues", {})]:
        assert has_value(key), f"{key} is not in values.yaml"
    for artifact in config["build"]["artifacts"]:
        variable = re.sub(r"[^A-Za-z0-9]", "_", artifact["image"])
        component = artifact["docker"]["target"]
        assert templates[f"{component}.image.repository"] == f"{{{{.IMAGE_REPO_{variable}}}}}"
        assert templates[f"{component}.image.tag"] == f"{{{{.IMAGE_TAG_{variable}}}}}"


def test_skaffold_profiles_switch_on_values_that_exist() -> None:
    profiles = {p["name"]: p for p in load(SKAFFOLD)["profiles"]}
    assert {"keda", "prometheus-adapter", "loadtest"} <= set(profiles)
    prefix = "/deploy/helm/releases/0/setValues/"
    for profile in profiles.values():
        for patch in profile["patches"]:
            if patch["path"].startswith(prefix):
                assert has_value(patch["path"].removeprefix(prefix)), patch["path"]


def test_skaffold_forwards_the_api_locust_and_grafana() -> None:
    config = load(SKAFFOLD)
    forwards = list(config["portForward"])
    for profile in config["profiles"]:
        forwards += [p["value"] for p in profile["patches"] if p["path"] == "/portForward/-"]
    by_port = {f["localPort"]: f for f in forwards}
    assert set(by_port) == {8000, 8089, 3000}
    release = config["deploy"]["helm"]["releases"][0]
    values: dict[str, Any] = {"loadtest": {"enabled": True}}
    services = {
        (o.name, release["namespace"])
        for o in render(values, release=release["name"])
        if o.kind == "Service"
    }
    assert (by_port[8000]["resourceName"], by_port[8000]["namespace"]) in services
    assert (by_port[8089]["resourceName"], by_port[8089]["namespace"]) in services
    assert by_port[3000]["resourceName"] == "kube-prometheus-stack-grafana"


# -- kind --------------------------------------------------------------------------------


def test_kind_cluster_has_one_control_plane_and_two_workers() -> None:
    config = load(KIND_CONFIG)
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = sorted(node["role"] for node in config["nodes"])
    assert roles == ["control-plane", "worker", "worker"]


def test_kind_runs_a_kubernetes_version_the_chart_is_validated_against() -> None:
    versions = {node["image"] for node in load(KIND_CONFIG)["nodes"]}
    (image,) = versions
    match = re.fullmatch(r"kindest/node:v(\d+)\.(\d+)\.\d+@sha256:[0-9a-f]{64}", image)
    assert match, f"pin the node image to a version and its digest: {image}"
    minor = int(match.group(2))
    oldest = int(kube_schema.OLDEST.split(".")[1])
    newest = int(kube_schema.NEWEST.split(".")[1])
    assert oldest <= minor <= newest


# -- k8s/ add-ons ------------------------------------------------------------------------


def test_prometheus_adapter_serves_the_metric_the_worker_hpa_asks_for_taking_the_max() -> None:
    (rule,) = load(K8S / "prometheus-adapter-values.yaml")["rules"]["external"]
    hpa = next(
        o.manifest for o in render_set("prometheus-adapter") if o.kind == "HorizontalPodAutoscaler"
    )
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]
    assert rule["name"]["as"] == metric["name"]
    assert rule["seriesQuery"].startswith(metric["name"] + "{")
    assert rule["metricsQuery"].startswith("max by (namespace, release, stream, group)")
    assert set(metric["selector"]["matchLabels"]) <= {"release", "stream", "group"}


def test_prometheus_adapter_query_is_valid_promql_once_the_adapter_fills_it_in(
    tmp_path: Path,
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is required under CI=true (Debian package prometheus)")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    (rule,) = load(K8S / "prometheus-adapter-values.yaml")["rules"]["external"]
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["name"]["as"])
        .replace(
            "<<.LabelMatchers>>",
            'namespace="tasks",release="demo",stream="task_stream",group="workers"',
        )
        .replace("<<.GroupBy>>", "namespace")
    )
    rules = tmp_path / "adapter.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "adapter",
                        "rules": [
                            {"record": "adapter:fastapi_redis_mini_stream_lag:max", "expr": query}
                        ],
                    }
                ]
            }
        )
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_sidecar_loads_the_charts_dashboard_label_from_every_namespace() -> None:
    sidecar = load(K8S / "kube-prometheus-stack-values.yaml")["grafana"]["sidecar"]["dashboards"]
    dashboards = next(
        o.manifest
        for o in render_set("defaults")
        if "grafana_dashboard" in o.manifest["metadata"]["labels"]
    )
    label = sidecar["label"]
    assert dashboards["metadata"]["labels"][label] == sidecar["labelValue"]
    assert sidecar["searchNamespace"] == "ALL"


def test_prometheus_selects_the_charts_service_monitors_and_rules() -> None:
    spec = load(K8S / "kube-prometheus-stack-values.yaml")["prometheus"]["prometheusSpec"]
    assert spec["serviceMonitorSelectorNilUsesHelmValues"] is False
    assert spec["ruleSelectorNilUsesHelmValues"] is False


def test_metrics_server_accepts_kinds_self_signed_kubelet_certificates() -> None:
    assert "--kubelet-insecure-tls" in load(K8S / "metrics-server-values.yaml")["args"]


def test_keda_namespace_matches_the_network_policy_exception() -> None:
    assert "-n keda " in MAKEFILE.read_text()
    assert default_values()["networkPolicy"]["kedaNamespace"] == "keda"


# -- mk/k8s.mk ---------------------------------------------------------------------------


def test_every_k8s_make_target_describes_itself() -> None:
    lines = MAKEFILE.read_text().splitlines()
    for target in MAKE_TARGETS:
        (line,) = [line for line in lines if line.startswith(f"{target}:")]
        assert re.search(r"## \S", line), f"{target} has no ## description"


def _make(
    target: str, path: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    return subprocess.run(
        [make, "--no-print-directory", "-C", str(REPO), target, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "PATH": path},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_each_k8s_target_names_the_tools_it_is_missing(target: str, tmp_path: Path) -> None:
    result = _make(target, str(tmp_path))
    assert result.returncode != 0
    (message,) = [
        line for line in result.stderr.splitlines() if line.startswith(f"make {target}: missing")
    ]
    assert any(tool in message.split() for tool in K8S_TOOLS), message


@pytest.fixture
def recording_tools(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose kind, helm, kubectl, skaffold and docker only append their argv to a log.

    `docker build --quiet` also prints an image ID, as the real one does: a digest of its
    arguments and of IMAGE_CONTENT, which stands for the code being built.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in K8S_TOOLS:
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        stub.chmod(0o755)
    (bin_dir / "docker").write_text(
        f'#!/bin/sh\necho "docker $*" >> "{log}"\n'
        'if [ "$1 $2" = "build --quiet" ]; then\n'
        '  digest=$(printf "%s" "$* ${IMAGE_CONTENT:-}" | sha256sum | cut -c1-64)\n'
        '  echo "sha256:$digest"\n'
        "fi\n"
    )
    system = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())
    return f"{bin_dir}{os.pathsep}{system}", log


def test_cluster_up_installs_pinned_add_ons_with_the_values_under_k8s(
    recording_tools: tuple[str, Path],
) -> None:
    path, log = recording_tools
    for scaler in ("keda", "prometheus-adapter"):
        assert _make("cluster-up", path, f"SCALER={scaler}").returncode == 0
    calls = log.read_text().splitlines()
    assert "kind create cluster --name fastapi-redis-mini --config kind-config.yaml" in calls
    installs = [c for c in calls if " upgrade --install " in c]
    installed = {c.split(" upgrade --install ")[1].split()[0] for c in installs}
    assert installed == {"metrics-server", "kube-prometheus-stack", "keda", "prometheus-adapter"}
    for call in installs:
        version = re.search(r"--version (\S+)", call)
        assert version, call
        assert re.fullmatch(r"\d+\.\d+\.\d+", version.group(1)), call
        values_file = re.search(r"-f (\S+)", call)
        assert values_file, call
        assert (REPO / values_file.group(1)).is_file(), call


def test_cluster_up_installs_only_one_external_metrics_provider(
    recording_tools: tuple[str, Path],
) -> None:
    path, log = recording_tools
    assert _make("cluster-up", path, "SCALER=keda").returncode == 0
    calls = log.read_text()
    assert "install keda " in calls
    assert "install prometheus-adapter " not in calls


def test_dev_runs_skaffold_with_the_profiles_for_the_scaler_and_locust(
    recording_tools: tuple[str, Path],
) -> None:
    path, log = recording_tools
    assert _make("dev", path, "SCALER=keda").returncode == 0
    assert _make("dev", path, "SCALER=cpu").returncode == 0
    calls = [c for c in log.read_text().splitlines() if c.startswith("skaffold")]
    assert calls == [
        "skaffold dev --kube-context kind-fastapi-redis-mini --profile keda,loadtest",
        "skaffold dev --kube-context kind-fastapi-redis-mini --profile loadtest",
    ]
    profiles = {p["name"] for p in load(SKAFFOLD)["profiles"]}
    assert {"keda", "loadtest"} <= profiles


def test_deploy_installs_the_chart_with_values_that_exist_then_runs_helm_test(
    recording_tools: tuple[str, Path],
) -> None:
    path, log = recording_tools
    assert _make("deploy", path).returncode == 0
    calls = log.read_text().splitlines()
    (install,) = [c for c in calls if " upgrade --install frm " in c]
    assert f" {CHART.relative_to(REPO)} " in install
    for key in re.findall(r"--set ([^=]+)=", install):
        assert has_value(key), key
    assert calls[-1] == "helm --kube-context kind-fastapi-redis-mini test frm -n fastapi-redis-mini"


def _deployed_tags(calls: list[str]) -> dict[str, str]:
    (install,) = [c for c in calls if " upgrade --install frm " in c]
    return dict(re.findall(r"--set (api|worker)\.image\.tag=(\S+)", install))


def test_deploy_tags_each_image_by_its_content_so_new_code_rolls_out(
    recording_tools: tuple[str, Path],
) -> None:
    path, log = recording_tools
    deployed = []
    for content in ("first build", "first build", "changed code"):
        log.write_text("")
        result = _make("deploy", path, env={"IMAGE_CONTENT": content})
        assert result.returncode == 0, result.stderr
        calls = log.read_text().splitlines()
        tags = _deployed_tags(calls)
        assert set(tags) == {"api", "worker"}
        for component, tag in tags.items():
            assert re.fullmatch(r"[0-9a-f]{12}", tag), tag
            image = f"fastapi-redis-mini-{component}:{tag}"
            (load,) = [c for c in calls if c.startswith("kind load docker-image")]
            assert image in load.split(), f"{image} was not loaded into kind"
            assert any(c.startswith("docker tag ") and c.endswith(f" {image}") for c in calls)
        assert tags["api"] != tags["worker"]
        deployed.append(tags)
    assert deployed[0] == deployed[1], "an unchanged build must not roll the pods"
    assert deployed[2]["api"] != deployed[0]["api"], "changed code must get a new tag"
    assert deployed[2]["worker"] != deployed[0]["worker"]


def test_deploy_stops_when_docker_build_gives_no_image_id(
    recording_tools: tuple[str, Path],
) -> None:
    path, log = recording_tools
    (Path(path.split(os.pathsep)[0]) / "docker").write_text(
        f'#!/bin/sh\necho "docker $*" >> "{log}"\n'
    )
    result = _make("deploy", path)
    assert result.returncode != 0
    assert "docker build printed no image ID for api" in result.stderr
    assert "upgrade --install" not in log.read_text()
