"""Render and lint the chart with the real Helm engine: the helm CLI when it is on PATH,
else the Helm Go SDK embedded in helm-python-sdk."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fastapi-redis-mini"
RELEASE = "demo"
NAMESPACE = "tasks"

Values = dict[str, Any]
Manifest = dict[str, Any]

EXTERNAL_REDIS_URL = "rediss://redis.example.internal:6380/2"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"

# Per-key quotas count in one partition, so with the default quotas a cluster's queue is one
# partition; these turn them off, for the value sets that test the partitioned queue.
QUOTAS_OFF: Values = {"submitRatePerKey": 0, "maxUnfinishedPerKey": 0, "maxStoredBytesPerKey": 0}

# The value sets every render, lint, schema and policy test runs over.
VALUE_SETS: dict[str, Values] = {
    "defaults": {},
    "keda": {"worker": {"autoscaling": {"keda": {"enabled": True}}}},
    "prometheus-adapter": {"worker": {"autoscaling": {"prometheusAdapter": {"enabled": True}}}},
    "external-redis": {
        "redis": {"mode": "external"},
        "externalRedis": {"url": EXTERNAL_REDIS_URL, "existingSecret": "managed-redis"},
    },
    "external-redis-tls-ca": {
        "redis": {"mode": "external"},
        "externalRedis": {
            "url": EXTERNAL_REDIS_URL,
            "existingSecret": "managed-redis",
            "tls": {"caSecret": "managed-redis-ca"},
        },
        "worker": {"autoscaling": {"keda": {"enabled": True}}},
    },
    "redis-cluster": {"redis": {"mode": "cluster"}, "api": QUOTAS_OFF},
    "redis-cluster-keda-networkpolicy": {
        "redis": {"mode": "cluster", "metrics": {"enabled": True}},
        "api": QUOTAS_OFF,
        "worker": {
            "autoscaling": {"keda": {"enabled": True, "prometheus": {"serverAddress": PROMETHEUS}}}
        },
        "networkPolicy": {"enabled": True},
    },
    "persistence-off": {"redis": {"persistence": {"enabled": False}}},
    "console": {"api": {"console": {"enabled": True, "adminKey": {"existingSecret": "admin"}}}},
    "loadtest": {"loadtest": {"enabled": True, "job": {"enabled": True}}},
    "ingress-networkpolicy": {
        "api": {"ingress": {"enabled": True, "className": "nginx"}},
        "networkPolicy": {"enabled": True},
    },
    "monitoring": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kps"}},
            "prometheusRule": {"enabled": True},
        },
        "api": {"apiKeys": {"existingSecret": "api-keys"}},
        "redis": {"metrics": {"enabled": True}},
    },
}


@dataclass(frozen=True)
class Rendered:
    """One object of a rendered release and the template it came from."""

    source: str
    manifest: Manifest

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def is_hook(self) -> bool:
        return "helm.sh/hook" in (self.manifest["metadata"].get("annotations") or {})

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} ({self.source})"


class RenderError(Exception):
    """The chart refused to render these values."""


def helm_cli() -> str | None:
    return shutil.which("helm")


def backend() -> str:
    return "helm CLI" if helm_cli() else "helm-python-sdk (Helm Go SDK)"


def load_all(text: str) -> Iterator[Any]:
    """The YAML documents in `text`, read as yaml.safe_load_all reads them, by libyaml: a
    rendered release parsed in 13 ms instead of 158 with the pure-Python reader, and the
    suite parses hundreds of them."""
    return yaml.load_all(text, Loader=yaml.CSafeLoader)


def _parse(source: str, text: str) -> Iterator[Rendered]:
    for document in load_all(text):
        if document:
            yield Rendered(source=source, manifest=document)


def _render_cli(helm: str, values: Values, release: str) -> tuple[list[Rendered], str]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as values_file:
        json.dump(values, values_file)
        values_file.flush()
        result = subprocess.run(
            [helm, "template", release, str(CHART), "-n", NAMESPACE, "-f", values_file.name],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RenderError(result.stderr)
        notes = subprocess.run(
            [
                helm,
                "install",
                release,
                str(CHART),
                "-n",
                NAMESPACE,
                "-f",
                values_file.name,
                "--dry-run=client",
            ],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    objects: list[Rendered] = []
    for chunk in result.stdout.split("\n---\n"):
        source = ""
        for line in chunk.splitlines():
            if line.startswith("# Source: "):
                source = line.removeprefix("# Source: ")
        objects.extend(_parse(source, chunk))
    return objects, notes.partition("NOTES:")[2]


@cache
def _sdk_chart() -> Any:
    """The chart loaded once: loaded charts are immutable and safe to share."""
    import helm_python

    return helm_python.Chart.load(CHART)


def _render_sdk(values: Values, release: str) -> tuple[list[Rendered], str]:
    import helm_python

    try:
        files = _sdk_chart().render(values, name=release, namespace=NAMESPACE, is_install=True)
    except helm_python.HelmError as error:
        raise RenderError(str(error)) from None
    objects: list[Rendered] = []
    notes = ""
    for source, text in sorted(files.items()):
        if source.endswith("NOTES.txt"):
            notes = text
        elif source.endswith((".yaml", ".yml")):
            objects.extend(_parse(source, text))
    return objects, notes


@cache
def _render_cached(values_json: str, release: str) -> tuple[tuple[Rendered, ...], str]:
    values = json.loads(values_json)
    helm = helm_cli()
    objects, notes = _render_cli(helm, values, release) if helm else _render_sdk(values, release)
    return tuple(objects), notes


def anonymous_unless_keyed(values: Values | None) -> Values:
    """`values`, with `api.allowAnonymous: true` unless they name an API-key Secret or set it.

    The chart refuses to render without API keys; the tests of everything else render as a
    local install would, and tests/chart/test_security.py sets both on purpose."""
    values = copy.deepcopy(values or {})
    api = values.setdefault("api", {})
    if not api.get("apiKeys", {}).get("existingSecret"):
        api.setdefault("allowAnonymous", True)
    return values


def render(values: Values | None = None, *, release: str = RELEASE) -> list[Rendered]:
    """Every object the chart renders for these values (hooks included)."""
    values = anonymous_unless_keyed(values)
    objects, _ = _render_cached(json.dumps(values, sort_keys=True), release)
    return [Rendered(o.source, copy.deepcopy(o.manifest)) for o in objects]


def render_notes(values: Values | None = None) -> str:
    _, notes = _render_cached(json.dumps(anonymous_unless_keyed(values), sort_keys=True), RELEASE)
    return notes


def render_set(name: str) -> list[Rendered]:
    return render(VALUE_SETS[name])


def lint(values: Values, kube_version: str) -> list[str]:
    """helm lint --strict; returns the error and warning messages."""
    values = anonymous_unless_keyed(values)
    helm = helm_cli()
    if helm:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as values_file:
            json.dump(values, values_file)
            values_file.flush()
            result = subprocess.run(
                [
                    helm,
                    "lint",
                    "--strict",
                    str(CHART),
                    "-f",
                    values_file.name,
                    "--kube-version",
                    kube_version,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        return [] if result.returncode == 0 else [result.stdout + result.stderr]
    import helm_python

    report = helm_python.lint(CHART, values, strict=True, kube_version=kube_version)
    problems = [str(m["error"]) for m in report["messages"] if int(m["severity"]) >= 2]
    return problems + [str(e) for e in report["errors"]]


def find(objects: list[Rendered], kind: str, component: str | None = None) -> list[Rendered]:
    """Objects of a kind, optionally only those labelled with a component."""
    return [
        o for o in objects if o.kind == kind and (component is None or component_of(o) == component)
    ]


def only(objects: list[Rendered], kind: str, component: str | None = None) -> Manifest:
    found = find(objects, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {[str(o) for o in found]}"
    return found[0].manifest


def component_of(obj: Rendered) -> str:
    labels = obj.manifest["metadata"].get("labels") or {}
    return str(labels.get("app.kubernetes.io/component", ""))


def pod_spec(manifest: Manifest) -> dict[str, Any]:
    """The pod spec of a workload or of a bare Pod."""
    if manifest["kind"] == "Pod":
        spec: dict[str, Any] = manifest["spec"]
        return spec
    template: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return template


def default_values() -> Values:
    loaded: Values = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded
