"""What a cluster would do with the rendered objects: resolve a name from a pod's namespace,
and decide whether NetworkPolicies let a pod in.

No API server runs here, so these follow the rules Kubernetes documents: a pod's
resolv.conf under dnsPolicy ClusterFirst (search <ns>.svc.<domain>, svc.<domain>, <domain>;
ndots 5), a Service's DNS name <svc>.<ns>.svc.<domain>, and NetworkPolicy's additive allow
rules (a pod no policy selects for Ingress accepts everything).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Labels = Mapping[str, str]


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str


def search_list(namespace: str, domain: str) -> list[str]:
    return [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]


def resolve(
    name: str, namespace: str, services: Iterable[Service], domain: str = "cluster.local"
) -> Service | None:
    """The Service a pod in `namespace` reaches by `name`, or None if cluster DNS has no answer."""
    records = {f"{s.name}.{s.namespace}.svc.{domain}": s for s in services}
    if name.endswith("."):
        return records.get(name.removesuffix("."))
    absolute_first = name.count(".") >= 5
    candidates = [f"{name}.{suffix}" for suffix in search_list(namespace, domain)]
    candidates = [name, *candidates] if absolute_first else [*candidates, name]
    for candidate in candidates:
        if candidate in records:
            return records[candidate]
    return None


def is_fully_qualified(name: str, domain: str) -> bool:
    return name.removesuffix(".").endswith(f".svc.{domain}")


def selects(selector: Mapping[str, Any] | None, labels: Labels) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicy sees it: where it runs, its labels and its named ports."""

    namespace: str
    labels: Labels
    ports: Mapping[str, int] = field(default_factory=dict)


def namespace_labels(namespace: str) -> dict[str, str]:
    # Every namespace carries this label since Kubernetes 1.22.
    return {"kubernetes.io/metadata.name": namespace}


def _peer_admits(peer: Mapping[str, Any], policy_namespace: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # pod traffic is judged by the pod and namespace selectors
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels(source.namespace)):
            return False
    elif source.namespace != policy_namespace:
        return False
    if "podSelector" in peer:
        return selects(peer["podSelector"], source.labels)
    return True


def _port_admits(rule_ports: list[Mapping[str, Any]] | None, target: Pod, port: int) -> bool:
    if not rule_ports:
        return True
    for item in rule_ports:
        if "port" not in item:
            return True
        wanted = item["port"]
        number = target.ports.get(wanted) if isinstance(wanted, str) else wanted
        if number == port and item.get("protocol", "TCP") == "TCP":
            return True
    return False


def admits(policies: Iterable[Mapping[str, Any]], source: Pod, target: Pod, port: int) -> bool:
    """Whether a TCP connection from `source` to `target`:`port` is allowed by these policies."""
    governing = [
        p
        for p in policies
        if p["metadata"].get("namespace", target.namespace) == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], target.labels)
    ]
    if not governing:
        return True
    for policy in governing:
        policy_namespace = policy["metadata"].get("namespace", target.namespace)
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            from_ok = not peers or any(_peer_admits(p, policy_namespace, source) for p in peers)
            if from_ok and _port_admits(rule.get("ports"), target, port):
                return True
    return False
