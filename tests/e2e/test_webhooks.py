"""Webhooks from a real worker to a real HTTP receiver: signed, retried, dead-lettered, guarded."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis

from fastapi_redis_mini_client import WebhookVerificationError, verify_webhook
from fastapi_redis_mini_harness.polling import poll

from .conftest import Start

pytestmark = [pytest.mark.slow, pytest.mark.single_server(reason="reads the dead-letter stream")]

SECRET = "whsec_" + base64.b64encode(b"webhook tests secret 32 bytes...").decode()
FAST = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_BACKOFF": "0.1", "WEBHOOK_BACKOFF_MAX": "0.2"}


@dataclass
class Receiver:
    """A local HTTP server that records deliveries; fails the first `failures` with 500."""

    failures: int = 0
    redirect_to: str = ""
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    attempts: int = 0
    server: ThreadingHTTPServer | None = None
    # While set and not released, an attempt hangs (its webhook-id noted) and then fails.
    hold: threading.Event | None = None
    held_ids: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.server_address[1]

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"

    def payloads(self) -> list[Any]:
        return [json.loads(body) for _, body in self.deliveries]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.attempts += 1
            if state.hold is not None and not state.hold.is_set():
                state.held_ids.append(self.headers["webhook-id"])
                state.hold.wait(30)
                self.send_response(500)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("location", state.redirect_to)
            elif state.attempts <= state.failures:
                self.send_response(500)
            else:
                state.deliveries.append((dict(self.headers.items()), body))
                self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def undelivered(redis_url: str) -> int:
    """Deliveries Redis still holds, due or claimed."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.zcard("task_stream:webhooks:due"))
    finally:
        client.close()


def dead_letters(redis_url: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries: list[tuple[str, dict[str, str]]] = client.xrange("task_stream:webhooks:dead")  # type: ignore[assignment]
        return [fields for _, fields in entries]
    finally:
        client.close()


def test_a_receiver_gets_signed_deliveries_of_the_events_it_asked_for(
    api: Start, worker: Start, receiver: Receiver
) -> None:
    env = {**FAST, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
    server = api(**env)
    worker(**env)
    body = {
        "prompt": "a b c",
        "params": {"duration": 0.3},
        "webhook": receiver.url(),
        "webhook_events": ["start", "output", "completed"],
    }
    submitted = httpx.post(f"{server.base_url}/tasks", json=body, timeout=10)
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]

    def all_arrived() -> bool:
        # Senders work in parallel, so deliveries may arrive out of order; their timestamps
        # (when each event happened) order them.
        arrived = sorted(receiver.payloads(), key=lambda p: p["timestamp"])
        if not arrived or arrived[-1]["type"] != "task.completed":
            return False
        chunks = "".join(p["data"]["chunk"] for p in arrived if p["type"] == "task.output")
        return bool(chunks == arrived[-1]["data"]["result"]["output"])

    poll(all_arrived, timeout=15)
    payloads = [verify_webhook(SECRET, headers, raw) for headers, raw in receiver.deliveries]
    payloads.sort(key=lambda p: p["timestamp"])
    kinds = [p["type"] for p in payloads]
    assert kinds[0] == "task.start"
    assert kinds[-1] == "task.completed"
    assert "task.progress" not in kinds  # not asked for
    assert {p["data"]["task_id"] for p in payloads} == {task_id}
    outputs = "".join(p["data"]["chunk"] for p in payloads if p["type"] == "task.output")
    completed = payloads[-1]["data"]
    assert completed["status"] == "DONE"
    assert outputs == completed["result"]["output"]
    ids = [headers["webhook-id"] for headers, _ in receiver.deliveries]
    assert len(set(ids)) == len(ids)


def test_a_receiver_that_is_down_gets_retries_then_the_delivery_is_dead_lettered(
    api: Start, worker: Start, receiver: Receiver, redis_url: str
) -> None:
    env = {**FAST, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "WEBHOOK_MAX_ATTEMPTS": "3"}
    server = api(**env)
    worker(**env)
    receiver.failures = 2  # the third attempt lands
    first = {"prompt": "retried", "webhook": receiver.url()}
    httpx.post(f"{server.base_url}/tasks", json=first, timeout=10).raise_for_status()
    poll(lambda: len(receiver.deliveries) == 1, timeout=15)
    assert receiver.attempts == 3

    receiver.failures = 1000  # down for good
    second = {"prompt": "never delivered", "webhook": receiver.url()}
    task_id = httpx.post(f"{server.base_url}/tasks", json=second, timeout=10).json()["task_id"]
    poll(lambda: any(d["task_id"] == task_id for d in dead_letters(redis_url)), timeout=15)
    [dead] = [d for d in dead_letters(redis_url) if d["task_id"] == task_id]
    assert (dead["attempts"], dead["error"], dead["event"]) == ("3", "answered 500", "completed")
    assert receiver.attempts == 3 + 3


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:9/hook", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::1]/hook", "non-public"),
        ("ftp://example.com/hook", "http or https"),
        ("http://user:pw@example.com/", "credentials"),
    ],
)
def test_a_webhook_the_guard_refuses_is_a_422_naming_the_field(
    api: Start, url: str, problem: str
) -> None:
    server = api(WEBHOOK_SECRET=SECRET)
    answer = httpx.post(
        f"{server.base_url}/tasks", json={"prompt": "p", "webhook": url}, timeout=10
    )
    assert answer.status_code == 422
    message = answer.json()["error"]["message"]
    assert message.startswith("webhook: ")
    assert problem in message


def test_a_name_resolving_to_a_private_address_and_a_redirect_to_one_are_refused(
    api: Start, worker: Start, receiver: Receiver, redis_url: str
) -> None:
    # `localhost` passes the submit (a name), and is refused once resolved, at delivery.
    server = api(**FAST)
    strict = worker(**FAST)
    by_name = {"prompt": "by name", "webhook": receiver.url(host="localhost")}
    named = httpx.post(f"{server.base_url}/tasks", json=by_name, timeout=10).json()["task_id"]
    poll(lambda: any(d["task_id"] == named for d in dead_letters(redis_url)), timeout=15)
    [dead] = [d for d in dead_letters(redis_url) if d["task_id"] == named]
    assert dead["error"].startswith("refused: localhost resolves to")
    assert dead["attempts"] == "1"  # a refusal is not retried

    # The receiver's name is allowed; its redirect to 127.0.0.1 is checked again, refused.
    assert strict.stop() == 0
    worker(**FAST, WEBHOOK_ALLOWED_HOSTS="localhost")
    receiver.redirect_to = receiver.url(host="127.0.0.1")
    redirected = {"prompt": "redirected", "webhook": receiver.url("localhost", "/redirect")}
    moved = httpx.post(f"{server.base_url}/tasks", json=redirected, timeout=10)
    moved_id = moved.json()["task_id"]
    poll(lambda: any(d["task_id"] == moved_id for d in dead_letters(redis_url)), timeout=15)
    [dead] = [d for d in dead_letters(redis_url) if d["task_id"] == moved_id]
    assert dead["error"].startswith("refused: 127.0.0.1 resolves to 127.0.0.1")
    assert receiver.deliveries == []
    assert time.time() - float(dead["failed_at"]) < 60


def test_a_delivery_whose_worker_is_killed_mid_attempt_is_made_by_the_restarted_worker(
    api: Start, worker: Start, receiver: Receiver, redis_url: str
) -> None:
    # WEBHOOK_TIMEOUT bounds an attempt (four requests with redirects), and the claim lapses
    # five seconds after that: 9 s here.
    env = {**FAST, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "WEBHOOK_TIMEOUT": "1"}
    server = api(**env)
    doomed = worker(**env)
    receiver.hold = threading.Event()
    body = {"prompt": "outlives its worker", "webhook": receiver.url()}
    task_id = httpx.post(f"{server.base_url}/tasks", json=body, timeout=10).json()["task_id"]
    poll(lambda: len(receiver.held_ids) > 0, timeout=15)
    doomed.kill()  # SIGKILL, mid-attempt: the receiver has the request, the worker is gone
    receiver.hold.set()
    worker(**env)
    poll(lambda: len(receiver.deliveries) > 0, timeout=30)
    [(headers, raw)] = receiver.deliveries
    assert headers["webhook-id"] == receiver.held_ids[0]  # the same message: receivers dedupe
    payload = verify_webhook(SECRET, headers, raw)
    assert (payload["type"], payload["data"]["task_id"]) == ("task.completed", task_id)
    assert payload["data"]["status"] == "DONE"
    poll(lambda: undelivered(redis_url) == 0, timeout=10)
    assert dead_letters(redis_url) == []


def test_a_delivery_backing_off_when_its_worker_stops_is_made_by_the_next_worker(
    api: Start, worker: Start, receiver: Receiver, redis_url: str
) -> None:
    env = {**FAST, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "WEBHOOK_BACKOFF": "3",
           "WEBHOOK_BACKOFF_MAX": "3"}  # fmt: skip
    server = api(**env)
    first = worker(**env)
    receiver.failures = 1
    body = {"prompt": "outlives a restart", "webhook": receiver.url()}
    httpx.post(f"{server.base_url}/tasks", json=body, timeout=10).raise_for_status()
    poll(lambda: receiver.attempts == 1, timeout=15)
    assert first.stop() == 0  # within its backoff: the delivery waits in Redis, not in it
    assert receiver.deliveries == []
    worker(**env)
    poll(lambda: len(receiver.deliveries) > 0, timeout=15)
    assert receiver.attempts == 2
    assert dead_letters(redis_url) == []
    poll(lambda: undelivered(redis_url) == 0, timeout=10)


def test_a_task_cancelled_before_it_started_sends_its_completed_delivery(
    api: Start, worker: Start, receiver: Receiver
) -> None:
    env = {**FAST, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
    server = api(**env)
    worker(**env)
    body = {"prompt": "never runs", "delay_seconds": 600, "webhook": receiver.url()}
    task_id = httpx.post(f"{server.base_url}/tasks", json=body, timeout=10).json()["task_id"]
    cancelled = httpx.delete(f"{server.base_url}/tasks/{task_id}", timeout=10)
    assert cancelled.status_code == 202, cancelled.text
    poll(lambda: len(receiver.deliveries) > 0, timeout=15)
    [(headers, raw)] = receiver.deliveries
    data = verify_webhook(SECRET, headers, raw)["data"]
    assert (data["task_id"], data["status"], data["result"]) == (task_id, "CANCELLED", None)


def test_a_cache_hit_sends_the_cached_result_to_its_webhook(
    api: Start, worker: Start, receiver: Receiver
) -> None:
    env = {**FAST, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
    server = api(**env)
    worker(**env)
    body = {"prompt": "asked twice", "webhook": receiver.url()}
    task_id = httpx.post(f"{server.base_url}/tasks", json=body, timeout=10).json()["task_id"]
    poll(lambda: len(receiver.deliveries) > 0, timeout=15)
    hit = httpx.post(f"{server.base_url}/tasks", json=body, timeout=10)
    assert hit.json()["task_id"] == task_id
    assert hit.json()["status"] == "DONE"  # answered at once, from the cache
    poll(lambda: len(receiver.deliveries) == 2, timeout=15)
    computed, cached = (verify_webhook(SECRET, h, raw)["data"] for h, raw in receiver.deliveries)
    assert cached["cached"] is True
    assert (cached["task_id"], cached["status"]) == (task_id, "DONE")
    assert cached["result"] == computed["result"]
    ids = {headers["webhook-id"] for headers, _ in receiver.deliveries}
    assert len(ids) == 2


def test_a_key_with_its_own_secret_gets_deliveries_signed_with_it_and_others_the_global_one(
    api: Start, worker: Start, receiver: Receiver
) -> None:
    own = "whsec_" + base64.b64encode(b"the hooked key's own signing secret").decode()
    env = {
        **FAST,
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "API_KEYS": "hooked-key,plain-key",
        # The worker finds a task's key by its scope, so it derives scopes as the api does.
        "TENANT_SECRET": "a tenant secret of 16+ characters",
        "WEBHOOK_KEY_SECRETS": f"hooked-key={own}",
    }
    server = api(**env)
    worker(**env)

    def submit(key: str, body: dict[str, Any]) -> str:
        answer = httpx.post(
            f"{server.base_url}/tasks", json=body, headers={"X-API-Key": key}, timeout=10
        )
        assert answer.status_code == 202, answer.text
        task_id: str = answer.json()["task_id"]
        return task_id

    # A run (its start and completed deliveries signed by the worker), a cancel before the
    # start (its delivery recorded by the api's script) and another key's run.
    ran = submit("hooked-key", {"prompt": "own secret", "webhook": receiver.url(),
                                "webhook_events": ["start", "completed"]})  # fmt: skip
    waiting = submit("hooked-key", {"prompt": "cancelled", "delay_seconds": 600,
                                    "webhook": receiver.url()})  # fmt: skip
    cancelled = httpx.delete(
        f"{server.base_url}/tasks/{waiting}", headers={"X-API-Key": "hooked-key"}, timeout=10
    )
    assert cancelled.status_code == 202, cancelled.text
    other = submit("plain-key", {"prompt": "global secret", "webhook": receiver.url()})
    poll(lambda: len(receiver.deliveries) == 4, timeout=15)

    signed_by: dict[tuple[str, str], str] = {}
    for headers, raw in receiver.deliveries:
        for name, secret in (("own", own), ("global", SECRET)):
            try:
                payload = verify_webhook(secret, headers, raw)
            except WebhookVerificationError:
                continue
            signed_by[(payload["data"]["task_id"], payload["type"])] = name
    assert signed_by == {
        (ran, "task.start"): "own",
        (ran, "task.completed"): "own",
        (waiting, "task.completed"): "own",
        (other, "task.completed"): "global",
    }


def test_a_worker_without_the_secret_of_a_deliverys_key_dead_letters_it_saying_why(
    api: Start, worker: Start, receiver: Receiver, redis_url: str
) -> None:
    own = "whsec_" + base64.b64encode(b"the hooked key's own signing secret").decode()
    env = {
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_BACKOFF": "0.1",
        "WEBHOOK_BACKOFF_MAX": "0.2",
        "WEBHOOK_MAX_ATTEMPTS": "2",
        "API_KEYS": "hooked-key",
        "WEBHOOK_KEY_SECRETS": f"hooked-key={own}",
    }
    server = api(**env, TENANT_SECRET="the api's tenant secret")
    # Another TENANT_SECRET: the worker derives other tenants, so it finds no secret.
    worker(**env, TENANT_SECRET="not the api's tenant secret")
    body = {"prompt": "unsigned", "webhook": receiver.url()}
    answer = httpx.post(
        f"{server.base_url}/tasks", json=body, headers={"X-API-Key": "hooked-key"}, timeout=10
    )
    task_id = answer.json()["task_id"]
    poll(lambda: any(d["task_id"] == task_id for d in dead_letters(redis_url)), timeout=15)
    [dead] = [d for d in dead_letters(redis_url) if d["task_id"] == task_id]
    assert dead["attempts"] == "2"
    assert dead["error"].startswith("this worker has no secret to sign it with")
    assert receiver.attempts == 0  # nothing unsigned, or signed with another key, was sent
