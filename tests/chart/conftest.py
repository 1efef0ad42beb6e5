"""Say at the end of the run which Helm engine and which schemas checked the chart."""

from __future__ import annotations

import json

import pytest

from . import kube_schema
from .helm import backend, helm_cli


def _engine() -> str:
    if helm_cli():
        return backend()
    import helm_python

    return f"{backend()} {helm_python.helm_sdk_version()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not any(
        "tests/chart/" in report.nodeid
        for reports in terminalreporter.stats.values()
        for report in reports
        if hasattr(report, "nodeid")
    ):
        return
    terminalreporter.section("helm chart")
    terminalreporter.write_line(f"rendered and linted by: {_engine()}")
    terminalreporter.write_line(
        f"Kubernetes schemas (strict): {kube_schema.OLDEST} and {kube_schema.NEWEST}"
    )
    for path in sorted(kube_schema.CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        terminalreporter.write_line(
            f"CRD schema {crd['apiVersion']} {crd['kind']}: {crd['source']}"
        )
