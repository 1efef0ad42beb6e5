"""The generated Redis password survives upgrades, and a new password rolls the pods.

Helm's `lookup` reads the live Secret during an upgrade. A minimal Kubernetes API on loopback
answers the two requests Helm makes for it, and the Helm Go SDK renders against it exactly as
`helm upgrade` would.
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

from .helm import CHART, NAMESPACE, RELEASE, anonymous_unless_keyed

SECRET_NAME = f"{RELEASE}-fastapi-redis-mini-redis"
SECRET_PATH = f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET_NAME}"
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
    """Serves the core API's resource list and the Secrets it holds; 404 for the rest."""

    secret: dict[str, Any] | None = None
    other_secrets: dict[str, dict[str, Any]]
    requests: list[str]


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append(path)
        body: dict[str, Any] | None = None
        if path == "/api/v1":
            body = CORE_RESOURCES
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
    for document in yaml.safe_load_all(files.get(f"{CHART.name}/templates/redis-secret.yaml", "")):
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
        for document in yaml.safe_load_all(text):
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
    assert pod_templates(api_server, {}) == pod_templates(api_server, {})


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
