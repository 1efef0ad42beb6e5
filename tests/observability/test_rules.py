"""The alert rules load in Prometheus, behave as their promtool unit tests describe, and plug
into the thresholds the chart renders."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.utils import floatToGoString

from ..chart import helm
from ..support.tools import PROMTOOL_ENV

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "fastapi-redis-mini" / "files" / "prometheus" / "rules.yaml"
RULE_TESTS = Path(__file__).with_name("rules_test.yaml")
DOC = REPO / "docs" / "observability.md"
SCHEMA = REPO / "charts" / "fastapi-redis-mini" / "values.schema.json"

pytestmark = pytest.mark.slow


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **PROMTOOL_ENV},
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def unit_tests() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    return cases


def test_rules_file_passes_promtool_check(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_fire_exactly_as_the_unit_tests_expect(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    from . import _oncall
    from .test_oncall_scenarios import ALL

    alerts = {rule["alert"] for rule in alert_rules()}
    fired = {
        check["alertname"]
        for case in unit_tests()
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    } | {
        _oncall.PREFIX + a.name
        for scenario in ALL
        for check in scenario.checks
        for a in (*check.pages, *check.warnings)
    }
    assert alerts, "no alerts found in the rules file"
    assert alerts <= fired, f"alerts no promtool case sees firing: {sorted(alerts - fired)}"


@pytest.mark.parametrize("system", ["an idle system", "a busy healthy system"])
def test_every_alert_is_checked_silent_on_a_healthy_system(system: str) -> None:
    (case,) = [case for case in unit_tests() if case["name"].startswith(system)]
    checks = case["alert_rule_test"]
    assert all(check["exp_alerts"] == [] for check in checks)
    assert {check["alertname"] for check in checks} == {rule["alert"] for rule in alert_rules()}


def test_every_alert_links_a_runbook_anchor_that_exists_in_the_docs() -> None:
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', DOC.read_text(encoding="utf-8")))
    for rule in alert_rules():
        url = rule["annotations"].get("runbook_url", "")
        assert url.startswith("docs/observability.md#"), (rule["alert"], url)
        assert url.partition("#")[2] in anchors, (rule["alert"], url)


def test_every_alert_has_a_row_in_the_docs() -> None:
    rows = set(re.findall(r"^\| \[`(\w+)`\]\(#alert-[a-z0-9-]+\)", DOC.read_text(), re.M))
    assert rows == {rule["alert"] for rule in alert_rules()}


def test_every_alert_has_a_runbook_with_meaning_impact_diagnosis_and_mitigation() -> None:
    text = DOC.read_text(encoding="utf-8")
    sections = {
        name: (severity, body)
        for name, severity, body in re.findall(
            r'^### <a id="[a-z0-9-]+"></a>`(\w+)` \((\w+)\)\n(.*?)(?=^#)', text, re.M | re.S
        )
    }
    for rule in alert_rules():
        severity, body = sections.get(rule["alert"], ("", ""))
        assert severity == rule["labels"]["severity"], rule["alert"]
        for part in ("Meaning", "Impact", "Diagnosis", "Mitigation"):
            assert f"- **{part}:** " in body, (rule["alert"], part)


def test_the_chart_links_each_alert_to_its_runbook_and_dashboard_absolutely(
    tmp_path: Path,
) -> None:
    rules = yaml.safe_load(
        chart_rules(
            tmp_path,
            {
                "metrics": {
                    "prometheusRule": {
                        "runbookBaseUrl": "https://git.example/frm/blob/main/",
                        "dashboardBaseUrl": "https://grafana.example/",
                    }
                }
            },
            release="shop",
        ).read_text()
    )
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        notes = rule["annotations"]
        assert notes["runbook_url"].startswith("https://git.example/frm/blob/main/docs/"), notes
        assert notes["dashboard_url"] == (
            "https://grafana.example/d/fastapi-redis-mini-overview"
            "?var-namespace={{ $labels.namespace }}&var-release={{ $labels.release }}"
        )


def chart_rules(tmp_path: Path, values: helm.Values, release: str) -> Path:
    """The groups of the chart's PrometheusRule, as a plain rules file."""
    metrics = values.get("metrics", {})
    enabled = {**metrics, "prometheusRule": {**metrics.get("prometheusRule", {}), "enabled": True}}
    values = {**values, "metrics": enabled}
    (rule,) = [o for o in helm.render(values, release=release) if o.kind == "PrometheusRule"]
    path = tmp_path / "chart-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule.manifest["spec"]["groups"]}))
    return path


def test_the_chart_renders_thresholds_the_alerts_read(promtool: str, tmp_path: Path) -> None:
    rules = chart_rules(
        tmp_path,
        {
            "api": {"maxBacklog": 500},
            "metrics": {
                "prometheusRule": {"runbookBaseUrl": "https://docs.example/"},
                "slo": {"queueWait": {"objective": 0.99, "thresholdSeconds": 120}},
            },
        },
        release="shop",
    )
    # A backlog of 450 is above 80% of this release's maxBacklog (500), far below the default;
    # a task waiting 100 s is within this release's 120 s threshold.
    lag = f'{{namespace="{helm.NAMESPACE}", release="shop", pod="api-0", stream="s", group="g"}}'
    case = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"fastapi_redis_mini_stream_lag{lag}", "values": "450x20"},
                    {
                        "series": f"fastapi_redis_mini_stream_oldest_undelivered_age_seconds{lag}",
                        "values": "100x20",
                    },
                    {
                        "series": f'fastapi_redis_mini_redis_up{{namespace="{helm.NAMESPACE}", '
                        'release="shop", pod="api-0"}',
                        "values": "1x20",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "FastapiRedisMiniBacklogNearLimit",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "namespace": helm.NAMESPACE,
                                    "release": "shop",
                                    "stream": "s",
                                    "group": "g",
                                },
                                "exp_annotations": {
                                    "summary": f"{helm.NAMESPACE}/shop: Backlog of s is 450, "
                                    "above 80% of maxBacklog",
                                    "description": f"{helm.NAMESPACE}/shop has held a backlog "
                                    "above 80% of api.maxBacklog for 10 minutes; at the limit, "
                                    "submits are refused with 429.",
                                    "runbook_url": "https://docs.example/docs/observability.md"
                                    "#alert-backlog-near-limit",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "FastapiRedisMiniOldestTaskWaitingTooLong",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "FastapiRedisMiniAlertThresholdsMissing",
                        "exp_alerts": [],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "chart_rules_test.yaml"
    test_file.write_text(yaml.safe_dump(case))
    result = run_promtool(promtool, "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def _schema_thresholds() -> list[float]:
    import json

    schema = json.loads(SCHEMA.read_text())
    queue_wait = schema["properties"]["metrics"]["properties"]["slo"]["properties"]["queueWait"]
    thresholds: list[float] = queue_wait["properties"]["thresholdSeconds"]["enum"]
    return thresholds


@pytest.mark.parametrize("threshold", _schema_thresholds())
def test_each_allowed_queue_wait_threshold_names_a_bucket_as_the_worker_writes_it(
    threshold: float, tmp_path: Path
) -> None:
    from fastapi_redis_mini.core.telemetry.metrics import QUEUE_WAIT_BUCKETS

    assert threshold in QUEUE_WAIT_BUCKETS
    rules = yaml.safe_load(
        chart_rules(
            tmp_path, {"metrics": {"slo": {"queueWait": {"thresholdSeconds": threshold}}}}, "r"
        ).read_text()
    )
    (record,) = [
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("record") == "fastapi_redis_mini:slo_queue_wait_threshold_seconds"
    ]
    assert record["labels"]["le"] == floatToGoString(threshold)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
def test_each_allowed_api_latency_threshold_names_a_bucket_as_the_api_writes_it(
    threshold: float, tmp_path: Path
) -> None:
    import json

    from fastapi_redis_mini.core.telemetry.metrics import HTTP_BUCKETS

    schema = json.loads(SCHEMA.read_text())
    slo = schema["properties"]["metrics"]["properties"]["slo"]["properties"]
    assert threshold in slo["apiLatency"]["properties"]["thresholdSeconds"]["enum"]
    assert threshold in HTTP_BUCKETS
    rules = yaml.safe_load(
        chart_rules(
            tmp_path, {"metrics": {"slo": {"apiLatency": {"thresholdSeconds": threshold}}}}, "r"
        ).read_text()
    )
    (record,) = [
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("record") == "fastapi_redis_mini:slo_api_latency_threshold_seconds"
    ]
    assert record["labels"]["le"] == floatToGoString(threshold)  # type: ignore[no-untyped-call]


def test_the_keda_scaled_object_is_named_for_the_alert_only_when_keda_scales(
    tmp_path: Path,
) -> None:
    def records(values: helm.Values) -> list[dict[str, Any]]:
        groups = yaml.safe_load(chart_rules(tmp_path, values, "shop").read_text())["groups"]
        return [
            rule
            for group in groups
            for rule in group["rules"]
            if rule.get("record") == "fastapi_redis_mini:config_keda_scaled_object"
        ]

    assert records({}) == []
    (record,) = records(helm.VALUE_SETS["keda"])
    objects = helm.render(
        {**helm.VALUE_SETS["keda"], "metrics": {"prometheusRule": {"enabled": True}}},
        release="shop",
    )
    (scaled,) = [o.name for o in objects if o.kind == "ScaledObject"]
    assert record["labels"]["scaledObject"] == scaled
