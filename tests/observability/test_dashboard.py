"""The committed dashboard is the generator's output and every query is scoped and well formed."""

from __future__ import annotations

import importlib.util
import re
import sys
from types import ModuleType

import pytest

from ..chart import helm
from . import _dashboard


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_dashboard", _dashboard.GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_json_equals_generator_output() -> None:
    rendered: str = load_generator().render()
    committed = _dashboard.DASHBOARD.read_text(encoding="utf-8")
    assert committed == rendered, "overview.json is stale: run `make dashboards` and commit it"


def test_panels_have_unique_ids_and_targets_unique_ref_ids() -> None:
    dashboard = _dashboard.load()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    for panel in _dashboard.panels(dashboard):
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids, f"panel {panel['title']!r} has no query"
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_query_selects_the_chosen_namespace_and_release() -> None:
    for query in _dashboard.queries(_dashboard.load()):
        assert 'namespace="$namespace"' in query.expr, query
        if query.needs_cluster:
            # kube-state-metrics series name the workload instead of carrying `release`.
            assert "$release" in query.expr, query
        else:
            assert 'release="$release"' in query.expr, query


def test_queue_gauges_are_combined_with_max_never_summed_across_replicas() -> None:
    gauges = ("stream_length", "stream_lag", "stream_pending", "dead_letter_length")
    for query in _dashboard.queries(_dashboard.load()):
        for gauge in gauges:
            if f"fastapi_redis_mini_{gauge}{{" in query.expr:
                pattern = rf"max by \(namespace, stream, group\) \(fastapi_redis_mini_{gauge}\{{"
                assert re.search(pattern, query.expr), query


def test_variables_offer_namespace_and_release() -> None:
    variables = _dashboard.variable_queries(_dashboard.load())
    assert set(variables) == {"namespace", "release"}
    assert variables["release"].endswith(", release)")
    assert 'namespace="$namespace"' in variables["release"]


@pytest.mark.parametrize("release", ["demo", "fastapi-redis-mini", "tasks-fastapi-redis-mini-eu"])
def test_scaling_panel_finds_the_worker_deployment_and_hpa_the_chart_renders(release: str) -> None:
    scaling = [query for query in _dashboard.queries(_dashboard.load()) if query.needs_cluster]
    matchers = {
        label: pattern.replace("$release", release)
        for query in scaling
        for label, pattern in re.findall(
            r'(deployment|horizontalpodautoscaler)=~"([^"]+)"', query.expr
        )
    }
    assert set(matchers) == {"deployment", "horizontalpodautoscaler"}, scaling

    objects = helm.render({}, release=release)
    names = {
        "deployment": [o.name for o in objects if o.kind == "Deployment"],
        "horizontalpodautoscaler": [o.name for o in objects if o.kind == "HorizontalPodAutoscaler"],
    }
    for label, pattern in matchers.items():
        # Prometheus anchors label regexes at both ends, as fullmatch does.
        matched = [name for name in names[label] if re.fullmatch(pattern, name)]
        assert len(matched) == 1, f"{label}=~{pattern!r} matches {matched} of {names[label]}"
        assert matched[0].endswith("-worker"), matched
    # With KEDA the chart renders a ScaledObject, and KEDA names the HPA it creates after it.
    keda = helm.render({"worker": {"autoscaling": {"keda": {"enabled": True}}}}, release=release)
    scaled = [o.name for o in keda if o.kind == "ScaledObject"]
    assert len(scaled) == 1, scaled
    assert re.fullmatch(matchers["horizontalpodautoscaler"], f"keda-hpa-{scaled[0]}")
