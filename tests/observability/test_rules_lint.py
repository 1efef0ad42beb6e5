"""A linter for the rules the chart renders, in the spirit of pint's checks.

No Prometheus rules linter installs from the registries this project uses (pint ships as a Go
binary), so the properties such a linter holds are checked here, on the chart's output:
required labels and annotations, aggregations that keep the release's labels, rate windows
long enough for the scrape interval, template labels the expression can carry, metric names
the services really export, and recorded series that some rule records.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..chart import helm
from . import _oncall

pytestmark = pytest.mark.slow

SEVERITIES = {"critical", "warning"}
ANNOTATIONS = {"summary", "description", "runbook_url"}
# Outside the services' own series: redis_exporter, kube-state-metrics and KEDA.
FOREIGN = ("redis_", "kube_", "keda_")
# Four scrapes at the chart's 15 s default; a 1-minute window could hold a single sample.
MIN_RANGE_SECONDS = 120
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _rules(tmp_path: Path) -> list[dict[str, Any]]:
    values: helm.Values = {
        "redis": {"mode": "cluster"},
        "worker": {
            "autoscaling": {
                "keda": {"enabled": True, "prometheus": {"serverAddress": helm.PROMETHEUS}}
            }
        },
        "metrics": {"prometheusRule": {"runbookBaseUrl": "https://git.example/frm/"}},
    }
    path = _oncall.chart_alert_rules(tmp_path, values, keep_annotations=True)
    groups = yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _rules(tmp_path_factory.mktemp("lint"))


def exported_metric_names() -> set[str]:
    """Every series name the api and the worker can expose."""
    from prometheus_client import REGISTRY

    import fastapi_redis_mini.api.metrics
    import fastapi_redis_mini.worker.metrics  # noqa: F401
    from fastapi_redis_mini.core.telemetry import metrics

    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("_count", "_sum", ""),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    for name, _doc, _value in metrics._QUEUE_GAUGES:
        names |= {f"{metrics.NAMESPACE}_{name}", f"{metrics.NAMESPACE}_partition_{name}"}
    names |= {f"{metrics.NAMESPACE}_{name}" for name, _doc, _value in metrics.LANE_GAUGES}
    names.add(f"{metrics.NAMESPACE}_redis_up")
    return names


def test_every_alert_has_a_severity_and_the_annotations_on_call_reads(
    rules: list[dict[str, Any]],
) -> None:
    for rule in (r for r in rules if "alert" in r):
        assert rule["labels"].get("severity") in SEVERITIES, rule["alert"]
        assert set(rule.get("annotations", {})) >= ANNOTATIONS, rule["alert"]
        assert rule["annotations"]["runbook_url"].startswith("https://"), rule["alert"]
        # A page is read on a phone, often in a list: its summary names the release.
        summary = rule["annotations"]["summary"]
        assert "{{ $labels.namespace }}/{{ $labels.release }}" in summary, rule["alert"]


def test_names_are_unique_and_recorded_series_follow_level_metric_operations(
    rules: list[dict[str, Any]],
) -> None:
    alerts = [r["alert"] for r in rules if "alert" in r]
    assert len(alerts) == len(set(alerts))
    for rule in (r for r in rules if "record" in r):
        assert re.fullmatch(r"fastapi_redis_mini:[a-z0-9_]+(:[a-z0-9_]+)?", rule["record"]), rule


def test_every_aggregation_keeps_the_namespace_and_every_alert_the_release(
    rules: list[dict[str, Any]],
) -> None:
    for rule in rules:
        for grouping in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            assert "namespace" in grouping, (rule.get("alert") or rule["record"], grouping)
        if "alert" in rule:
            # The release label comes either from an aggregation or from a join.
            assert "release" in rule["expr"], rule["alert"]


def test_rate_windows_hold_several_scrapes(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        for fn, amount, unit in re.findall(
            r"\b(rate|increase|deriv|delta)\([^\[]*\[(\d+)([smhd])\]", rule["expr"]
        ):
            seconds = int(amount) * UNITS[unit]
            assert seconds >= MIN_RANGE_SECONDS, (rule.get("alert") or rule["record"], fn)


def test_template_labels_are_ones_the_expression_can_carry(rules: list[dict[str, Any]]) -> None:
    carried: dict[str, set[str]] = {}
    for rule in (r for r in rules if "record" in r):
        labels = set(rule.get("labels", {}))
        for grouping in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            labels |= {label.strip() for label in grouping.split(",")}
        carried.setdefault(rule["record"], set()).update(labels)
    for rule in (r for r in rules if "alert" in r):
        expr = rule["expr"]
        possible = set(re.findall(r"\w+", expr))
        for record, labels in carried.items():
            if record in expr:
                possible |= labels
        text = " ".join(rule["annotations"].values())
        for label in set(re.findall(r"\$labels\.(\w+)", text)):
            assert label in possible, (rule["alert"], label)


def test_rules_read_only_series_the_services_export_or_the_rules_record(
    rules: list[dict[str, Any]],
) -> None:
    exported = exported_metric_names()
    recorded = {r["record"] for r in rules if "record" in r}
    for rule in rules:
        expr = re.sub(r"\{[^}]*\}", "", rule["expr"])
        for name in re.findall(r"\b(fastapi_redis_mini[_:][a-z0-9_:]+)", expr):
            known = name in recorded if ":" in name else name in exported
            assert known, (rule.get("alert") or rule["record"], name)
        for name in re.findall(r"\b((?:redis|kube|keda)_[a-z0-9_]+)\b", expr):
            assert name.startswith(FOREIGN)


def test_waits_are_bounded(rules: list[dict[str, Any]]) -> None:
    for rule in (r for r in rules if "alert" in r):
        for key in ("for", "keep_firing_for"):
            if key in rule:
                amount, unit = re.fullmatch(r"(\d+)([smh])", rule[key]).groups()  # type: ignore[union-attr]
                assert int(amount) * UNITS[unit] <= 3600, (rule["alert"], key)
