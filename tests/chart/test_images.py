"""The chart drives the images: run the api, worker and Redis containers with exactly what the
chart renders (command, env from the ConfigMap and Secret, user, read-only root, emptyDirs as
tmpfs, dropped capabilities), submit a task, and see it DONE.

The host network stands in for the cluster network and `--add-host` for Service names. Ports
are the only values changed from the defaults, so the run cannot collide with anything else
listening on this machine. No registry is reachable, so Redis runs the chart's own command and
redis.conf in a local image with Debian's redis-server instead of the official image.
"""

from __future__ import annotations

import base64
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastapi_redis_mini_harness.ports import free_port

from ..support.docker import (
    Container,
    docker,
    project_images,
    redis_standin_image,
    removing,
    require_engine,
    start_container,
    wait_for,
    wait_for_http,
)
from .helm import Manifest, Rendered, only, pod_spec, render, render_set

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {
        "redis": free_port(),
        "api": free_port(),
        "api_metrics": free_port(),
        "metrics": free_port(),
    }


@pytest.fixture(scope="module")
def objects(ports: dict[str, int]) -> list[Rendered]:
    return render(
        {
            # The stand-in runs Debian's Redis 7.0, older than the 7.2 the service user's
            # rules name (CLIENT SETINFO, WAITAOF); tests/chart/test_redis_acl.py runs the
            # chart's Redis with those rules on a real server.
            "redis": {"port": ports["redis"], "acl": {"enabled": False}},
            "api": {
                "port": ports["api"],
                "metricsPort": ports["api_metrics"],
                "service": {"port": ports["api"]},
            },
            "worker": {"metricsPort": ports["metrics"]},
        }
    )


def service_names(objects: list[Rendered]) -> list[str]:
    return [o.name for o in objects if o.kind == "Service"]


def secret_value(objects: list[Rendered], name: str, key: str) -> str:
    for obj in objects:
        if obj.kind == "Secret" and obj.name == name:
            return base64.b64decode(obj.manifest["data"][key]).decode()
    raise AssertionError(f"the chart renders no Secret {name}")


def container_env(objects: list[Rendered], spec: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes would give the container: envFrom ConfigMaps, then env."""
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(
            next(o.manifest["data"] for o in objects if o.kind == "ConfigMap" and o.name == name)
        )
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_value(objects, ref["name"], ref["key"])
    return env


def docker_run_args(workload: Manifest) -> tuple[str, list[str], list[str], list[str]]:
    """(user, tmpfs paths, hardening flags, entrypoint + args) from the rendered pod spec."""
    pod = pod_spec(workload)
    spec = pod["containers"][0]
    security = pod["securityContext"]
    user = f"{security['runAsUser']}:{security['runAsGroup']}"
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    # The kubelet creates emptyDirs world-writable; a tmpfs gets the same mode.
    tmpfs = [f"{m['mountPath']}:mode=1777" for m in spec["volumeMounts"] if m["name"] in empty_dirs]
    context = spec["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    flags = [f"--cap-drop={cap}" for cap in context["capabilities"]["drop"]]
    if context["allowPrivilegeEscalation"] is False:
        flags.append("--security-opt=no-new-privileges")
    command = [*spec["command"], *spec.get("args", [])]
    return user, tmpfs, flags, command


@contextlib.contextmanager
def run_workload(
    image: str, objects: list[Rendered], workload: Manifest, extra: list[str] | None = None
) -> Iterator[Container]:
    user, tmpfs, flags, command = docker_run_args(workload)
    started = start_container(
        image,
        env=container_env(objects, pod_spec(workload)["containers"][0]),
        loopback_hosts=service_names(objects),
        user=user,
        read_only=True,
        tmpfs=tmpfs,
        name_prefix="fastapi-redis-mini-chart",
        extra_args=[*flags, *(extra or []), "--entrypoint", command[0]],
        command=command[1:],
    )
    with removing(started) as container:
        yield container


def http_probes(workload: Manifest, port: int) -> list[str]:
    spec = pod_spec(workload)["containers"][0]
    probes = (spec[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe"))
    return [f"http://127.0.0.1:{port}{probe['path']}" for probe in probes]


def test_images_run_under_the_charts_own_settings_and_finish_a_task(
    objects: list[Rendered], ports: dict[str, int]
) -> None:
    require_engine()
    images = project_images()
    redis_workload = only(objects, "StatefulSet", "redis")
    api_workload = only(objects, "Deployment", "api")
    worker_workload = only(objects, "Deployment", "worker")

    with (
        tempfile.TemporaryDirectory() as config_dir,
        tempfile.TemporaryDirectory() as scripts_dir,
        tempfile.TemporaryDirectory() as data_dir,
    ):
        # The ConfigMap volumes, as the kubelet would project them (read-only).
        for directory, component in ((config_dir, "redis"), (scripts_dir, "redis-scripts")):
            for name, text in only(objects, "ConfigMap", component)["data"].items():
                Path(directory, name).write_text(text)
                Path(directory, name).chmod(0o644)
            Path(directory).chmod(0o755)
        # The claim from the volumeClaimTemplate, writable for the pod as fsGroup makes it.
        Path(data_dir).chmod(0o1777)
        volumes = [
            f"--volume={config_dir}:/etc/redis:ro",
            f"--volume={scripts_dir}:/scripts:ro",
            f"--volume={data_dir}:/data",
        ]
        redis_run = run_workload(redis_standin_image(), objects, redis_workload, volumes)
        with redis_run as redis_container:
            probe = pod_spec(redis_workload)["containers"][0]["readinessProbe"]["exec"]["command"]
            wait_for(
                lambda: True if _exec_ok(redis_container, probe) else None,
                timeout=30,
                what="the rendered Redis readiness probe",
            )
            with (
                run_workload(images["worker"].tag, objects, worker_workload) as worker,
                run_workload(images["api"].tag, objects, api_workload) as api,
            ):
                for url in http_probes(api_workload, ports["api"]):
                    wait_for_http(url, container=api)
                for url in http_probes(worker_workload, ports["metrics"]):
                    wait_for_http(url, container=worker)

                base = f"http://127.0.0.1:{ports['api']}"
                # The backlog series the External-metric HPA selects is the one the api exports,
                # on its metrics port: the public one has no /metrics.
                assert httpx.get(f"{base}/metrics", timeout=10).status_code == 404
                metrics_url = f"http://127.0.0.1:{ports['api_metrics']}/metrics"
                exported = httpx.get(metrics_url, timeout=10).text
                assert _hpa_selects_an_exported_series(exported)
                submitted = httpx.post(
                    f"{base}/tasks", json={"prompt": "chart", "params": {"duration": 0.05}}
                )
                assert submitted.status_code == 202, submitted.text
                task_id = submitted.json()["task_id"]
                done = wait_for(
                    lambda: _status_if_final(base, task_id), timeout=30, what="the task to finish"
                )
                assert done == "DONE"

                hook = next(o.manifest for o in objects if o.kind == "Pod")
                with run_workload(images["api"].tag, objects, hook) as test_pod:
                    exit_code = wait_for(
                        lambda: (
                            None if test_pod.is_running() else int(test_pod.state()["ExitCode"])
                        ),
                        timeout=90,
                        what="the helm test pod",
                    )
                    assert exit_code == 0, test_pod.logs()

                # The api's preStop hook, run as the kubelet runs it: inside the container,
                # as its user, on its read-only root. From then on answers close connections.
                api_spec = pod_spec(api_workload)["containers"][0]
                docker("exec", api.name, *api_spec["lifecycle"]["preStop"]["exec"]["command"])
                time.sleep(0.5)  # the api looks for the hook's marker every quarter second
                leaving = httpx.get(f"{base}/healthz", timeout=10)
                assert leaving.headers.get("connection") == "close"

                # A scale-down: SIGTERM while a task runs, with the rendered grace period.
                running = httpx.post(
                    f"{base}/tasks", json={"prompt": "drain", "params": {"duration": 2.0}}
                ).json()["task_id"]
                wait_for(
                    lambda: True if _status(base, running) == "RUNNING" else None,
                    timeout=30,
                    what="the task to start",
                )
                grace = pod_spec(worker_workload)["terminationGracePeriodSeconds"]
                stopped = worker.stop(grace)
                assert stopped.exit_code == 0, worker.logs()
                assert stopped.seconds < grace
                assert _status(base, running) == "DONE", "the scale-down cut a task in half"


def _exec_ok(container: Container, command: list[str]) -> bool:
    try:
        docker("exec", container.name, *command)
    except Exception:
        return False
    return True


def _hpa_selects_an_exported_series(exposition: str) -> bool:
    hpa = only(render_set("prometheus-adapter"), "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]
    # `release` is added at scrape time by the chart's ServiceMonitor, not by the api.
    wanted = {k: v for k, v in metric["selector"]["matchLabels"].items() if k != "release"}.items()
    return any(
        sample.name == metric["name"] and wanted <= sample.labels.items()
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    )


def _status(base: str, task_id: str) -> str:
    return str(httpx.get(f"{base}/tasks/{task_id}", timeout=10).json()["status"])


def _status_if_final(base: str, task_id: str) -> str | None:
    status = str(
        httpx.get(f"{base}/tasks/{task_id}", params={"wait": 2}, timeout=10).json()["status"]
    )
    return status if status in ("DONE", "FAILED", "CANCELLED") else None
