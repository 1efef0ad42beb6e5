"""Tracing is set from the chart: the OTEL_* variables reach both services, checked early."""

from __future__ import annotations

import pytest

from .helm import RenderError, Values, render


def config_of(values: Values) -> dict[str, str]:
    (configmap,) = [
        o.manifest for o in render(values) if o.kind == "ConfigMap" and o.name.endswith("-mini")
    ]
    data: dict[str, str] = configmap["data"]
    return data


def test_tracing_stays_off_by_default() -> None:
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in config_of({})


def test_otel_values_become_the_sdks_variables_for_api_and_worker() -> None:
    values: Values = {
        "otel": {
            "exporterOtlpEndpoint": "http://otel-collector.observability:4318",
            "tracesSampler": "parentbased_traceidratio",
            "tracesSamplerArg": "0.25",
            "resourceAttributes": "deployment.environment=prod",
        }
    }
    data = config_of(values)
    assert data["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert (data["OTEL_TRACES_SAMPLER"], data["OTEL_TRACES_SAMPLER_ARG"]) == (
        "parentbased_traceidratio",
        "0.25",
    )
    assert data["OTEL_RESOURCE_ATTRIBUTES"] == "deployment.environment=prod"
    configmap = next(o.name for o in render(values) if o.kind == "ConfigMap")
    for obj in render(values):
        if obj.kind == "Deployment" and obj.name.endswith(("-api", "-worker")):
            (container,) = obj.manifest["spec"]["template"]["spec"]["containers"]
            assert {"configMapRef": {"name": configmap}} in container["envFrom"]


@pytest.mark.parametrize(
    ("otel", "field"),
    [
        ({"exporterOtlpEndpoint": "collector:4318"}, "otel.exporterOtlpEndpoint"),
        ({"tracesSampler": "sometimes"}, "otel.tracesSampler"),
        ({"tracesSamplerArg": "1.5"}, "otel.tracesSamplerArg"),
        ({"resourceAttributes": "no equals sign"}, "otel.resourceAttributes"),
    ],
)
def test_bad_otel_values_fail_naming_the_field(otel: dict[str, str], field: str) -> None:
    with pytest.raises(RenderError, match=field.split(".")[1]):
        render({"otel": otel})
