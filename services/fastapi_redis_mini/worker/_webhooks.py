"""Webhook deliveries of one worker: signed, retried with backoff, then dead-lettered.

A delivery never holds a task slot: the worker hands it over (`send`) and goes on, and
WEBHOOK_CONCURRENCY senders work through the deliveries apart from the tasks. A delivery that
fails (a connection error, a timeout, an answer other than 2xx) is tried again after a
backoff (WEBHOOK_BACKOFF doubling up to WEBHOOK_BACKOFF_MAX, with jitter) without holding a
sender meanwhile; after WEBHOOK_MAX_ATTEMPTS it goes to the webhook dead-letter stream, where
an operator sees the task, the URL and the last error. A URL the guard refuses (see
core/webhooks.py) is dead-lettered at once: it will not become allowed by trying again.

Each attempt resolves the host, checks every address it resolves to, and connects to the
address it checked (TLS still verifies the host's name), so a name cannot be re-pointed at a
private address between the check and the request. Redirects are followed by hand, at most
_MAX_REDIRECTS, each checked the same way.

Deliveries wait in memory: those not yet delivered when the worker stops, after its grace,
are dead-lettered as such, and those of a worker that dies are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import orjson

from ..core.queue import Job, QueueUnavailable, TaskQueue
from ..core.settings import Settings
from ..core.webhooks import (
    AllowedHosts,
    WebhookEvent,
    WebhookRefused,
    check_address,
    check_url,
    secret_key,
    signature,
)
from . import metrics

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 3
# Deliveries a worker holds at most; past it new ones are dead-lettered at once, so a
# receiver that is down cannot grow the worker's memory without bound.
_MAX_WAITING = 10_000


@dataclass(slots=True)
class Message:
    """One delivery: the same id and body on every attempt."""

    message_id: str
    task_id: str
    url: str
    kind: str
    body: bytes
    attempts: int = 0
    last_error: str = ""


class _Undelivered(Exception):  # noqa: N818 - an outcome of one attempt
    pass


def _pinned(url: str, address: str) -> str:
    """The URL with its host replaced by the address it was checked at."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


class WebhookSender:
    """The deliveries of one worker, sent by WEBHOOK_CONCURRENCY senders."""

    def __init__(self, settings: Settings, queue: TaskQueue) -> None:
        self.settings = settings
        self.queue = queue
        secret = settings.webhook_secret
        self._key = secret_key(secret.get_secret_value()) if secret is not None else None
        self._allowed = AllowedHosts(settings.webhook_allowed_hosts)
        self._waiting: asyncio.Queue[Message] = asyncio.Queue()
        self._held = 0  # waiting, sending or backing off
        self._senders: list[asyncio.Task[None]] = []
        self._retries: dict[asyncio.TimerHandle, Message] = {}
        self._http: httpx.AsyncClient | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._warned = False

    def send(self, job: Job, kind: WebhookEvent, data: dict[str, Any]) -> None:
        """Deliver `data` to the job's webhook, if it asked for this kind of event."""
        if not job.webhook or kind not in job.webhook_events:
            return
        if self._key is None:
            # The api refuses a webhook without a secret; a worker configured without one
            # (unlike its api) can only say so.
            if not self._warned:
                self._warned = True
                log.warning("a task asks for a webhook but this worker has no WEBHOOK_SECRET")
            return
        body = {"type": f"task.{kind.value}", "timestamp": time.time(), "data": data}
        message = Message(
            f"msg_{uuid.uuid4().hex}", job.task_id, job.webhook, kind.value, orjson.dumps(body)
        )
        if self._held >= _MAX_WAITING:
            message.last_error = f"more than {_MAX_WAITING} deliveries waiting in this worker"
            asyncio.get_running_loop().create_task(self._dead_letter(message))
            return
        self._hold(message)

    def _hold(self, message: Message) -> None:
        self._held += 1
        self._idle.clear()
        if not self._senders:
            self._start()
        self._waiting.put_nowait(message)

    def _start(self) -> None:
        self._http = httpx.AsyncClient(
            timeout=self.settings.webhook_timeout, follow_redirects=False, trust_env=False
        )
        self._senders = [
            asyncio.create_task(self._sender(), name=f"webhook-{n}")
            for n in range(self.settings.webhook_concurrency)
        ]

    def _release(self) -> None:
        self._held -= 1
        if self._held == 0:
            self._idle.set()

    async def _sender(self) -> None:
        while True:
            message = await self._waiting.get()
            message.attempts += 1
            try:
                await self._attempt(message)
            except WebhookRefused as refused:
                message.last_error = f"refused: {refused}"
                await self._dead_letter(message)
            except _Undelivered as failed:
                message.last_error = str(failed)
                if message.attempts >= self.settings.webhook_max_attempts:
                    await self._dead_letter(message)
                else:
                    metrics.webhook_deliveries.labels("retried").inc()
                    self._retry_later(message)
                    continue
            except Exception:
                log.exception("webhook delivery failed", extra={"task_id": message.task_id})
                message.last_error = "an internal error; see the worker's log"
                await self._dead_letter(message)
            else:
                metrics.webhook_deliveries.labels("delivered").inc()
            self._release()

    def _retry_later(self, message: Message) -> None:
        s = self.settings
        ceiling = min(s.webhook_backoff * 2 ** (message.attempts - 1), s.webhook_backoff_max)
        delay = ceiling / 2 + random.random() * ceiling / 2
        loop = asyncio.get_running_loop()

        def due() -> None:
            del self._retries[handle]
            self._waiting.put_nowait(message)

        handle = loop.call_later(delay, due)
        self._retries[handle] = message

    async def _attempt(self, message: Message) -> None:
        assert self._http is not None
        assert self._key is not None
        url = message.url
        for _ in range(_MAX_REDIRECTS + 1):
            host, port = check_url(url, self._allowed)
            address = await self._checked_address(host, port)
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "user-agent": "fastapi-redis-mini-webhooks",
                "host": urlsplit(url).netloc,
                "webhook-id": message.message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": signature(
                    self._key, message.message_id, timestamp, message.body
                ),
            }
            extensions = {"sni_hostname": host} if url.startswith("https") else {}
            try:
                answer = await self._http.post(
                    _pinned(url, address),
                    content=message.body,
                    headers=headers,
                    extensions=extensions,
                )
            except httpx.HTTPError as error:
                raise _Undelivered(f"{type(error).__name__}: {error}") from None
            if 200 <= answer.status_code < 300:
                return
            location = answer.headers.get("location")
            if 300 <= answer.status_code < 400 and location:
                url = urljoin(url, location)
                continue
            raise _Undelivered(f"answered {answer.status_code}")
        raise _Undelivered(f"more than {_MAX_REDIRECTS} redirects")

    async def _checked_address(self, host: str, port: int) -> str:
        """The first address `host` resolves to, once every one of them passed the guard."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            return str(literal)
        loop = asyncio.get_running_loop()
        try:
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            raise _Undelivered(f"cannot resolve {host} ({error})") from None
        addresses = [str(info[4][0]) for info in found]
        for address in addresses:
            check_address(host, address, self._allowed)
        return addresses[0]

    async def _dead_letter(self, message: Message) -> None:
        metrics.webhook_deliveries.labels("dead_lettered").inc()
        log.warning(
            "webhook dead-lettered after %d attempts: %s",
            message.attempts, message.last_error, extra={"task_id": message.task_id},
        )  # fmt: skip
        fields = {
            "task_id": message.task_id,
            "message_id": message.message_id,
            "url": message.url,
            "event": message.kind,
            "attempts": str(message.attempts),
            "error": message.last_error[:500],
            "failed_at": repr(time.time()),
        }
        try:
            await self.queue.dead_letter_webhook(message.task_id, fields)
        except QueueUnavailable as error:
            log.warning("webhook dead letter lost: %s", error, extra={"task_id": message.task_id})

    async def close(self, within: float) -> None:
        """Deliver what is held for up to `within` seconds; dead-letter the rest."""
        if not self._senders:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within)
        for handle in self._retries:
            handle.cancel()
        for sender in self._senders:
            sender.cancel()
        await asyncio.wait(self._senders, timeout=1)
        left = list(self._retries.values())
        while not self._waiting.empty():
            left.append(self._waiting.get_nowait())
        for message in left:
            message.last_error = message.last_error or "the worker stopped before delivering"
            await self._dead_letter(message)
        if self._http is not None:
            await self._http.aclose()
