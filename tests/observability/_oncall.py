"""On-call scenarios as promtool unit tests, run against the rules the chart renders.

A scenario is a history of series, one sample a minute, written as functions of the minute,
and checks that say, at a time, which alerts page (critical), which warn, and that every
other alert is quiet. The release's thresholds come from the chart (its `.config` group),
so the scenarios read the rules exactly as a cluster would.

Annotations are dropped from the rendered alerts: a scenario says who is told, not how it is
worded (tests/observability/rules_test.yaml holds the wording).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..chart import helm
from ..support.tools import PROMTOOL_ENV

NAMESPACE = helm.NAMESPACE
RELEASE = "shop"
PREFIX = "FastapiRedisMini"
ALERTMANAGER = helm.REPO / "k8s" / "alertmanager.yaml"

Curve = Callable[[int], float | None]


@dataclass(frozen=True)
class Counter:
    """A counter that grows by `per_minute(t)` during minute t (None: not scraped then)."""

    per_minute: Curve


@dataclass(frozen=True)
class Gauge:
    value: Curve


def flat(value: float) -> Curve:
    return lambda _t: value


def after(minute: int, before: float, then: float) -> Curve:
    """`before` until `minute`, `then` from it on."""
    return lambda t: before if t < minute else then


@dataclass(frozen=True)
class Alert:
    """An alert by its short name (without the FastapiRedisMini prefix) and its own labels."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


def alert(name: str, **labels: str) -> Alert:
    return Alert(name, labels)


@dataclass(frozen=True)
class Check:
    at: str
    pages: tuple[Alert, ...] = ()
    warnings: tuple[Alert, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    minutes: int
    series: Mapping[str, Counter | Gauge]
    checks: tuple[Check, ...]
    values: helm.Values = field(default_factory=dict)


def series(metric: str, **labels: str) -> str:
    """A series of this release: `namespace` and `release` added, as the scrape adds them."""
    all_labels = {"namespace": NAMESPACE, "release": RELEASE, **labels}
    return metric + "{" + ", ".join(f'{k}="{v}"' for k, v in all_labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(round(value, 9))


def samples(curve: Counter | Gauge, minutes: int) -> str:
    values: list[str] = []
    total = 0.0
    for t in range(minutes + 1):
        if isinstance(curve, Counter):
            step = curve.per_minute(t)
            if step is None:
                values.append("_")
                continue
            total += step if t > 0 else 0.0
            values.append(_number(total))
        else:
            value = curve.value(t)
            values.append("_" if value is None else _number(value))
    return " ".join(values)


def chart_alert_rules(
    tmp_path: Path, values: helm.Values, *, keep_annotations: bool = False
) -> Path:
    """The chart's PrometheusRule groups as a plain rules file, alerts without annotations
    unless asked to keep them."""
    metrics = values.get("metrics", {})
    rule_values = {"enabled": True, **metrics.get("prometheusRule", {})}
    objects = helm.render(
        {**values, "metrics": {**metrics, "prometheusRule": rule_values}}, release=RELEASE
    )
    (rule,) = [o for o in objects if o.kind == "PrometheusRule"]
    groups = rule.manifest["spec"]["groups"]
    for group in groups:
        for r in group["rules"]:
            if not keep_annotations:
                r.pop("annotations", None)
    path = tmp_path / "chart-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    return path


def alert_severities(rules_file: Path) -> dict[str, str]:
    groups = yaml.safe_load(rules_file.read_text(encoding="utf-8"))["groups"]
    return {r["alert"]: r["labels"]["severity"] for g in groups for r in g["rules"] if "alert" in r}


def _expected(check: Check, alertname: str) -> list[dict[str, Any]]:
    expected = []
    for severity, alerts in (("critical", check.pages), ("warning", check.warnings)):
        for a in alerts:
            if PREFIX + a.name == alertname:
                labels = {"namespace": NAMESPACE, "release": RELEASE, **a.labels}
                expected.append({"exp_labels": {**labels, "severity": severity}})
    return expected


def promtool_test(
    scenario: Scenario, rules_file: Path, alertnames: Iterable[str]
) -> dict[str, Any]:
    """The promtool test file: every alert checked at every check time."""
    names = sorted(alertnames)
    for check in scenario.checks:
        unknown = {PREFIX + a.name for a in (*check.pages, *check.warnings)} - set(names)
        assert not unknown, f"{scenario.name}: no such alerts {sorted(unknown)}"
    return {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": scenario.name,
                "interval": "1m",
                "input_series": [
                    {"series": name, "values": samples(curve, scenario.minutes)}
                    for name, curve in scenario.series.items()
                ],
                "alert_rule_test": [
                    {"eval_time": check.at, "alertname": name, "exp_alerts": _expected(check, name)}
                    for check in scenario.checks
                    for name in names
                ],
            }
        ],
    }


def run_scenario(promtool: str, scenario: Scenario, tmp_path: Path) -> None:
    rules_file = chart_alert_rules(tmp_path, scenario.values)
    test = promtool_test(scenario, rules_file, alert_severities(rules_file))
    test_file = tmp_path / "scenario_test.yaml"
    test_file.write_text(yaml.safe_dump(test, width=10_000), encoding="utf-8")
    result = subprocess.run(
        [promtool, "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **PROMTOOL_ENV},
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# -- Alertmanager's inhibitions, applied to what a check expects to fire

_MATCHER = re.compile(r'^\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*$')


def _matches(matchers: list[str], labels: Mapping[str, str]) -> bool:
    for text in matchers:
        found = _MATCHER.match(text)
        assert found, f"matcher not understood: {text}"
        name, op, value = found.groups()
        actual = labels.get(name, "")
        hit = re.fullmatch(value, actual) is not None if "~" in op else actual == value
        if hit == op.startswith("!"):
            return False
    return True


def _labels(a: Alert, severity: str) -> dict[str, str]:
    return {
        "alertname": PREFIX + a.name,
        "namespace": NAMESPACE,
        "release": RELEASE,
        "severity": severity,
        **a.labels,
    }


def notified(check: Check, config: Path = ALERTMANAGER) -> list[dict[str, str]]:
    """The alerts of a check left after the Alertmanager example's inhibit_rules."""
    rules = yaml.safe_load(config.read_text(encoding="utf-8"))["inhibit_rules"]
    firing = [_labels(a, "critical") for a in check.pages]
    firing += [_labels(a, "warning") for a in check.warnings]
    left = []
    for target in firing:
        inhibited = any(
            _matches(rule["target_matchers"], target)
            and any(
                source is not target
                and _matches(rule["source_matchers"], source)
                and all(source.get(k) == target.get(k) for k in rule.get("equal", []))
                for source in firing
            )
            for rule in rules
        )
        if not inhibited:
            left.append(target)
    return left
