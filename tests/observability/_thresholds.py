"""The threshold group the chart renders for a release, as a rules file for a test Prometheus."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..chart import helm


def chart_threshold_rules(
    path: Path, release: str, namespace: str, values: helm.Values | None = None
) -> Path:
    """The release's group `fastapi-redis-mini.config`, relabelled into `namespace`.

    The chart labels its series with the namespace it is installed in; the helper renders in
    its own namespace, so the label is moved to the one the test's targets carry.
    """
    metrics = (values or {}).get("metrics", {})
    enabled = {**metrics, "prometheusRule": {**metrics.get("prometheusRule", {}), "enabled": True}}
    objects = helm.render({**(values or {}), "metrics": enabled}, release=release)
    (rule,) = [o for o in objects if o.kind == "PrometheusRule"]
    (config,) = [g for g in rule.manifest["spec"]["groups"] if g["name"].endswith(".config")]
    for record in config["rules"]:
        assert record["labels"]["release"] == release
        record["labels"]["namespace"] = namespace
    path.write_text(yaml.safe_dump({"groups": [config]}), encoding="utf-8")
    return path
