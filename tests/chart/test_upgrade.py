"""The generated Redis password survives upgrades.

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

from .helm import CHART, NAMESPACE, RELEASE

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
    """Serves the core API's resource list and, when set, one Secret; 404 for the rest."""

    secret: dict[str, Any] | None = None
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def render_against(server: FakeApiServer, values: dict[str, Any]) -> dict[str, Any] | None:
    """The Redis Secret an upgrade against this API server would apply, or None."""
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
        files = config.render(chart, values, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    for document in yaml.safe_load_all(files.get(f"{CHART.name}/templates/redis-secret.yaml", "")):
        if document:
            secret: dict[str, Any] = document
            return secret
    return None


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


def test_an_existing_secret_is_used_as_it_is_and_never_looked_up(
    api_server: FakeApiServer,
) -> None:
    values = {"redis": {"auth": {"existingSecret": "my-redis"}}}
    assert render_against(api_server, values) is None
    assert SECRET_PATH not in api_server.requests
