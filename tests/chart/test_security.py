"""The chart's secure defaults: no render without API keys unless asked, the Ingress routes
the task API only, and the api's metrics stay on their own port."""

from __future__ import annotations

import pytest

from .helm import RenderError, Values, find, only, render


def ingress_paths(values: Values) -> list[str]:
    ingress = only(render(values), "Ingress", "api")
    (rule,) = ingress["spec"]["rules"]
    return [path["path"] for path in rule["http"]["paths"]]


def test_the_chart_refuses_to_render_without_api_keys() -> None:
    with pytest.raises(RenderError, match=r"api\.apiKeys\.existingSecret is not set"):
        render({"api": {"allowAnonymous": False}})


def test_anonymous_access_renders_only_when_asked_for() -> None:
    assert find(render({"api": {"allowAnonymous": True}}), "Deployment", "api")


def test_api_keys_from_a_secret_render_without_allow_anonymous() -> None:
    values = {"api": {"allowAnonymous": False, "apiKeys": {"existingSecret": "api-keys"}}}
    assert find(render(values), "Deployment", "api")


def test_the_ingress_routes_only_the_task_api() -> None:
    assert ingress_paths({"api": {"ingress": {"enabled": True}}}) == ["/tasks"]


def test_the_ingress_routes_the_docs_only_when_they_are_on() -> None:
    values = {"api": {"ingress": {"enabled": True}, "docsEnabled": True}}
    assert ingress_paths(values) == ["/tasks", "/docs", "/redoc", "/openapi.json"]


def test_docs_are_off_by_default() -> None:
    config = only(render({}), "ConfigMap", "config")
    assert config["data"]["DOCS_ENABLED"] == "false"


def test_prometheus_scrapes_the_api_on_its_metrics_port_not_the_public_one() -> None:
    objects = render({"metrics": {"serviceMonitor": {"enabled": True}}})
    monitor = only(objects, "ServiceMonitor", "api")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    service = only(objects, "Service", "api")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000,
        "metrics": 9101,
    }
