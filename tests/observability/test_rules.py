"""The alert rules load in Prometheus and behave as their promtool unit tests describe."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "fastapi-redis-mini" / "files" / "prometheus" / "rules.yaml"
RULE_TESTS = Path(__file__).with_name("rules_test.yaml")

pytestmark = pytest.mark.slow


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_rules_file_passes_promtool_check(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_fire_exactly_as_the_unit_tests_expect(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    cases = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    fired = {
        check["alertname"]
        for case in cases["tests"]
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    assert alerts, "no alerts found in the rules file"
    assert alerts <= fired, f"alerts no promtool case sees firing: {sorted(alerts - fired)}"
