"""What an upgrade reads from the cluster: the generated Redis password survives upgrades, a
new password rolls the pods, and the live Redis StatefulSet refuses changes it cannot take.

Helm's `lookup` reads the live Secret and StatefulSet during an upgrade. A minimal Kubernetes
API on loopback answers the requests Helm makes for them, and the Helm Go SDK renders against
it exactly as `helm upgrade` would.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from .helm import CHART, NAMESPACE, RELEASE, anonymous_unless_keyed, load_all, only, render

SECRET_NAME = f"{RELEASE}-fastapi-redis-mini-redis"
SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET_NAME}"
STATEFULSET_NAME = f"{RELEASE}-fastapi-redis-mini-redis"
STATEFULSET_PATH = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/{STATEFULSET_NAME}"
APPS_RESOURCES = {
    "kind": "APIResourceList",
    "groupVersion": "apps/v1",
    "resources": [
        {
            "name": "statefulsets",
            "singularName": "statefulset",
            "namespaced": True,
            "kind": "StatefulSet",
            "verbs": ["get", "list"],
        },
    ],
}
CORE_RESOURCES = {
    "kind": "APIResourceList",
    "groupVersion": "v1",
    "resources": [
        {
            "name": "secrets",
            "singularName": "secret",
            "namespaced": True,
            "kind": "Secret",
            "verbs": ["get", "list"],
        },
    ],
}


class FakeApiServer(ThreadingHTTPServer):
    """Serves the core and apps API's resource lists, the Redis Secret and the other objects
    it holds by path; 404 for the rest."""

    secret: dict[str, Any] | None = None
    other_secrets: dict[str, dict[str, Any]]
    statefulset: dict[str, Any] | None = None
    requests: list[str]


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append(path)
        body: dict[str, Any] | None = None
        if path == "/api/v1":
            body = CORE_RESOURCES
        elif path == "/apis/apps/v1":
            body = APPS_RESOURCES
        elif path == STATEFULSET_PATH:
            body = self.server.statefulset
        elif path == SECRET_PATH:
            body = self.server.secret
        else:
            body = self.server.other_secrets.get(path)
        if body is None:
            body = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
            }
            self._send(404, body)
        else:
            self._send(200, body)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.other_secrets = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def render_against(server: FakeApiServer, values: dict[str, Any]) -> dict[str, Any] | None:
    """The Redis Secret an upgrade against this API server would apply, or None."""
    files = upgrade_files(server, values)
    for document in load_all(files.get(f"{CHART.name}/templates/redis-secret.yaml", "")):
        if document:
            secret: dict[str, Any] = document
            return secret
    return None


def pod_templates(server: FakeApiServer, values: dict[str, Any]) -> dict[str, Any]:
    """The pod template of each Deployment and StatefulSet an upgrade would apply, by name."""
    templates = {}
    for source, text in upgrade_files(server, values).items():
        if not source.endswith(".yaml"):
            continue
        for document in load_all(text):
            if document and document["kind"] in ("Deployment", "StatefulSet"):
                templates[document["metadata"]["name"]] = document["spec"]["template"]
    return templates


def upgrade_files(server: FakeApiServer, values: dict[str, Any]) -> dict[str, str]:
    import helm_python

    host, port = server.server_address[:2]
    kubeconfig = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://{host!s}:{port}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
    )
    with (
        helm_python.Config(kubeconfig_content=kubeconfig, namespace=NAMESPACE) as config,
        helm_python.Chart.load(CHART) as chart,
    ):
        files: dict[str, str] = config.render(
            chart,
            anonymous_unless_keyed(values),
            name=RELEASE,
            namespace=NAMESPACE,
            is_upgrade=True,
        )
    return files


def password(secret: dict[str, Any] | None) -> str:
    assert secret is not None, "the chart rendered no Redis Secret"
    return base64.b64decode(secret["data"]["redis-password"]).decode()


def test_an_upgrade_keeps_the_password_the_install_generated(api_server: FakeApiServer) -> None:
    api_server.secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": NAMESPACE},
        "data": {"redis-password": base64.b64encode(b"generated-at-install").decode()},
    }
    assert password(render_against(api_server, {})) == "generated-at-install"
    assert SECRET_PATH in api_server.requests


def test_without_a_secret_in_the_cluster_a_new_password_is_generated(
    api_server: FakeApiServer,
) -> None:
    first = password(render_against(api_server, {}))
    second = password(render_against(api_server, {}))
    assert SECRET_PATH in api_server.requests
    assert len(first) == 32
    assert first != second


def test_an_existing_secret_is_used_as_it_is_and_no_password_is_generated(
    api_server: FakeApiServer,
) -> None:
    values = {"redis": {"auth": {"existingSecret": "my-redis"}}}
    assert render_against(api_server, values) is None
    assert SECRET_PATH not in api_server.requests


def _secret(name: str, key: str, password: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {key: base64.b64encode(password).decode()},
    }


def test_upgrades_keep_the_pods_while_the_generated_password_stays(
    api_server: FakeApiServer,
) -> None:
    api_server.secret = _secret(SECRET_NAME, "redis-password", b"generated-at-install")
    # Every password the chart generates: the default user's and the service user's.
    api_server.secret["data"]["service-password"] = base64.b64encode(b"service").decode()
    assert pod_templates(api_server, {}) == pod_templates(api_server, {})


def test_an_upgrade_to_the_acl_keeps_the_password_and_adds_the_service_users(
    api_server: FakeApiServer,
) -> None:
    api_server.secret = _secret(SECRET_NAME, "redis-password", b"generated-at-install")
    secret = render_against(api_server, {})
    assert password(secret) == "generated-at-install"
    assert secret is not None
    service = base64.b64decode(secret["data"]["service-password"]).decode()
    assert len(service) == 32
    assert service != "generated-at-install"


def test_rotating_an_existing_secret_rolls_redis_the_api_and_the_worker_on_upgrade(
    api_server: FakeApiServer,
) -> None:
    values = {"redis": {"auth": {"existingSecret": "my-redis"}}}
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/my-redis"
    api_server.other_secrets[path] = _secret("my-redis", "redis-password", b"first")
    before = pod_templates(api_server, values)
    api_server.other_secrets[path] = _secret("my-redis", "redis-password", b"rotated")
    after = pod_templates(api_server, values)
    assert path in api_server.requests
    for component in ("redis", "api", "worker"):
        name = f"{RELEASE}-fastapi-redis-mini-{component}"
        assert before[name] != after[name], f"{component} keeps the old password"


# -- changes the live Redis StatefulSet cannot take ----------------------------------------

CLUSTER = {"redis": {"mode": "cluster"}}


def installed(server: FakeApiServer, values: dict[str, Any]) -> None:
    """The cluster holds the Redis StatefulSet as an install with these values created it."""
    server.statefulset = only(render(values), "StatefulSet", "redis")


def refusal(server: FakeApiServer, values: dict[str, Any]) -> str:
    import helm_python

    with pytest.raises(helm_python.HelmError) as refused:
        upgrade_files(server, values)
    assert STATEFULSET_PATH in server.requests
    return str(refused.value)


def test_an_upgrade_with_the_same_layout_renders(api_server: FakeApiServer) -> None:
    installed(api_server, CLUSTER)
    assert f"{RELEASE}-fastapi-redis-mini-redis" in pod_templates(api_server, CLUSTER)
    assert STATEFULSET_PATH in api_server.requests


@pytest.mark.parametrize(
    "change", [{"masters": 4}, {"replicasPerMaster": 2}], ids=["masters", "replicas"]
)
def test_an_upgrade_that_changes_the_clusters_layout_is_refused_saying_what_to_do(
    api_server: FakeApiServer, change: dict[str, int]
) -> None:
    installed(api_server, CLUSTER)
    message = refusal(api_server, {"redis": {"mode": "cluster", "cluster": change}})
    assert "the cluster was created with 3 masters x 1 replicas" in message
    assert "Changing the layout" in message
    assert "redis.cluster.allowLayoutChange=true" in message
    allowed = {"redis": {"mode": "cluster", "cluster": {**change, "allowLayoutChange": True}}}
    assert pod_templates(api_server, allowed)


def test_a_statefulset_from_before_the_layout_annotation_is_judged_by_its_pod_count(
    api_server: FakeApiServer,
) -> None:
    installed(api_server, CLUSTER)
    assert api_server.statefulset is not None
    del api_server.statefulset["metadata"]["annotations"]
    assert pod_templates(api_server, CLUSTER)
    message = refusal(api_server, {"redis": {"mode": "cluster", "cluster": {"masters": 4}}})
    assert "the cluster was created with 6 pods" in message


@pytest.mark.parametrize(
    ("before", "after"), [("standalone", "cluster"), ("cluster", "standalone")]
)
def test_switching_redis_mode_in_place_is_refused_saying_what_to_do(
    api_server: FakeApiServer, before: str, after: str
) -> None:
    installed(api_server, {"redis": {"mode": before}})
    message = refusal(api_server, {"redis": {"mode": after}})
    assert "redis.mode" in message
    assert "kubectl delete statefulset" in message


@pytest.mark.parametrize(
    "persistence",
    [{"size": "2Gi"}, {"enabled": False}, {"storageClass": "fast"}],
    ids=["size", "off", "class"],
)
def test_a_new_volume_claim_template_is_refused_saying_what_to_do(
    api_server: FakeApiServer, persistence: dict[str, Any]
) -> None:
    installed(api_server, {})
    message = refusal(api_server, {"redis": {"persistence": persistence}})
    assert "redis.persistence" in message
    assert "--cascade=orphan" in message
