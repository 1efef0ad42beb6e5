"""Read the committed overview dashboard the way Grafana would: panels, targets, variables."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "fastapi-redis-mini" / "files" / "grafana" / "overview.json"
GENERATOR = REPO / "tools" / "grafana_dashboard.py"

# Series only a Kubernetes cluster provides (kube-state-metrics).
CLUSTER_ONLY_PREFIXES = ("kube_",)


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str
    legend: str

    @property
    def needs_cluster(self) -> bool:
        return any(prefix in self.expr for prefix in CLUSTER_ONLY_PREFIXES)

    def resolved(self, variables: dict[str, str]) -> str:
        """The expression with Grafana's variables replaced, longest name first."""
        expr = self.expr
        for name in sorted(variables, key=len, reverse=True):
            expr = expr.replace(f"${name}", variables[name])
        return expr


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that draws data, including those inside collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(
            panel=panel["title"],
            ref_id=target["refId"],
            expr=target["expr"],
            legend=target.get("legendFormat", ""),
        )
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """name -> query of each query variable."""
    return {
        variable["name"]: variable["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    }
