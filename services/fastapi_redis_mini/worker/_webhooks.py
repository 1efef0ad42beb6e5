"""Webhook deliveries: recorded in Redis, sent by any worker, signed, retried, dead-lettered.

A delivery is recorded in Redis before anything is sent: a `completed` one in the same atomic
step as its task's final status (finish.lua, and start.lua, cancel.lua and submit.lua for the
tasks that end without a run), the others (`start`, `progress`, `output`) as they happen. Every
worker's sender claims due deliveries for one attempt at a time (webhook_claim.lua); a claim is
a lease, so the deliveries of a worker that dies or restarts mid-attempt are claimed again by
another sender once the lease runs out. Deliveries are therefore at-least-once: a receiver
dedupes by `webhook-id`, the same on every attempt of a message.

A delivery never holds a task slot: WEBHOOK_CONCURRENCY attempts run apart from the tasks. One
that fails (a connection error, a timeout, an answer other than 2xx) is due again after a
backoff (WEBHOOK_BACKOFF doubling up to WEBHOOK_BACKOFF_MAX, with jitter), waiting in Redis, not
in a sender; after WEBHOOK_MAX_ATTEMPTS it goes to the webhook dead-letter stream, where an
operator sees the task, the URL and the last error. A URL the guard refuses (see
core/webhooks.py) is dead-lettered at once: it will not become allowed by trying again.

Each attempt resolves the host, checks every address it resolves to, and connects to the
address it checked (TLS still verifies the host's name), so a name cannot be re-pointed at a
private address between the check and the request. Redirects are followed by hand, at most
_MAX_REDIRECTS, each checked the same way.
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
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import orjson

from ..core.queue import Job, QueueUnavailable, TaskQueue, WebhookMessage, WebhookVerdict
from ..core.settings import Settings
from ..core.webhooks import (
    AllowedHosts,
    SigningKeys,
    WebhookEvent,
    WebhookRefused,
    check_address,
    check_url,
    signature,
)
from . import metrics

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 3
# How often an idle sender looks for deliveries due: those recorded by the api (a cancel, a
# cache hit) or by another worker, and those of a worker that died, once their lease is over.
_POLL_SECONDS = 1.0
# A claim outlives the longest attempt by this much before another sender may take it.
_LEASE_MARGIN = 5.0
# How long a stopping sender waits to hand back an attempt it cut short.
_RELEASE_SECONDS = 1.0


class _Undelivered(Exception):  # noqa: N818 - an outcome of one attempt
    pass


def _pinned(url: str, address: str) -> str:
    """The URL with its host replaced by the address it was checked at."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def body_of(message: WebhookMessage) -> bytes:
    """What a delivery POSTs: the same bytes on every attempt of one message."""
    return orjson.dumps(
        {"type": f"task.{message.event}", "timestamp": message.timestamp, "data": message.data}
    )


class WebhookSender:
    """One worker's share of the deliveries: at most WEBHOOK_CONCURRENCY attempts at once.

    Each delivery is signed with the secret of the API key that submitted its task
    (WEBHOOK_KEY_SECRETS, found by the task's scope), else with WEBHOOK_SECRET. Without any
    secret it sends nothing and claims nothing: the api refuses a webhook it cannot sign.
    """

    def __init__(self, settings: Settings, queue: TaskQueue) -> None:
        self.settings = settings
        self.queue = queue
        self._keys = SigningKeys.from_settings(settings)
        self._allowed = AllowedHosts(settings.webhook_allowed_hosts)
        # Every redirect is a request of its own, each bounded by WEBHOOK_TIMEOUT.
        self._attempt_limit = settings.webhook_timeout * (_MAX_REDIRECTS + 1)
        self.lease = self._attempt_limit + _LEASE_MARGIN
        self._attempts: set[asyncio.Task[None]] = set()
        self._recording: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._keys.any

    def message(self, job: Job, kind: WebhookEvent, data: dict[str, Any]) -> WebhookMessage | None:
        """The delivery of `data` to the job's webhook, if it asked for this kind of event.

        Each message has an id of its own; a `completed` one sent again in a retried write
        of its outcome is recorded once all the same, as finish.lua never writes over a final
        status. A worker without the secret to sign it still records the delivery, for a
        worker that has one to send.
        """
        if not job.webhook or kind not in job.webhook_events:
            return None
        if self._keys.for_scope(job.scope) is None and not self._warned:
            # The api refuses a webhook it cannot sign; a worker configured without the
            # secret (unlike its api) can only say so.
            self._warned = True
            log.warning(
                "a task asks for a webhook but this worker has no secret to sign it with "
                "(WEBHOOK_KEY_SECRETS for its API key, or WEBHOOK_SECRET)",
                extra={"task_id": job.task_id},
            )
        message_id = f"msg_{uuid.uuid4().hex}"
        return WebhookMessage(
            message_id, job.task_id, job.webhook, kind.value, time.time(), data, job.scope
        )

    def send(self, job: Job, kind: WebhookEvent, data: dict[str, Any]) -> None:
        """Record a `start`, `progress` or `output` delivery, if the job asked for it."""
        message = self.message(job, kind, data)
        if message is None:
            return
        recording = asyncio.get_running_loop().create_task(self._record(message))
        self._recording.add(recording)
        recording.add_done_callback(self._recording.discard)

    async def _record(self, message: WebhookMessage) -> None:
        try:
            await self.queue.enqueue_webhooks([message])
        except QueueUnavailable as error:
            log.warning(
                "webhook %s delivery not recorded, so not sent: %s", message.event, error,
                extra={"task_id": message.task_id},
            )  # fmt: skip
            return
        self.wake()

    def wake(self) -> None:
        """Deliveries were recorded: look for due ones now rather than at the next poll."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Claim and send due deliveries until `stopping` is set."""
        if not self._keys.any:
            await stopping.wait()
            return
        # Imported here: a worker without webhook keys never loads httpx (a tenth of its start).
        import httpx

        self._http = httpx.AsyncClient(
            timeout=self.settings.webhook_timeout, follow_redirects=False, trust_env=False
        )
        failures = 0
        while not stopping.is_set():
            self._wake.clear()
            free = self.settings.webhook_concurrency - len(self._attempts)
            pause = _POLL_SECONDS
            if free > 0:
                try:
                    messages = await self.queue.claim_webhooks(free, self.lease)
                    failures = 0
                except QueueUnavailable as error:
                    failures += 1
                    log.warning("redis cannot hand out webhook deliveries (%s); retrying", error)
                    messages = []
                    pause = min(_POLL_SECONDS * 2**failures, 30.0)
                for message in messages:
                    attempt = asyncio.create_task(self._deliver(message))
                    self._attempts.add(attempt)
                    attempt.add_done_callback(self._attempt_ended)
                if len(messages) >= free:
                    continue  # more may be due
            wakes = [asyncio.ensure_future(e.wait()) for e in (self._wake, stopping)]
            await asyncio.wait(wakes, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
            for wake in wakes:
                wake.cancel()

    def _attempt_ended(self, attempt: asyncio.Task[None]) -> None:
        self._attempts.discard(attempt)
        self._wake.set()  # a sender is free

    async def _deliver(self, message: WebhookMessage) -> None:
        if message.attempt > self.settings.webhook_max_attempts:
            # Its last attempt's sender went away mid-attempt: claimed once more than allowed.
            message.last_error = message.last_error or "its senders stopped mid-attempt"
            await self._dead_letter(message)
            return
        try:
            async with asyncio.timeout(self._attempt_limit):
                await self._attempt(message, body_of(message))
        except asyncio.CancelledError:
            # Stopping: hand the message back at once rather than at the end of its lease.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_RELEASE_SECONDS):
                    await self.queue.settle_webhook(message, WebhookVerdict.RELEASE)
            raise
        except WebhookRefused as refused:
            message.last_error = f"refused: {refused}"
            await self._dead_letter(message)
        except (_Undelivered, TimeoutError) as failed:
            message.last_error = str(failed) or f"no answer within {self._attempt_limit:g}s"
            if message.attempt >= self.settings.webhook_max_attempts:
                await self._dead_letter(message)
            else:
                await self._retry_later(message)
        except Exception:
            log.exception("webhook delivery failed", extra={"task_id": message.task_id})
            message.last_error = "an internal error; see the worker's log"
            await self._dead_letter(message)
        else:
            metrics.webhook_deliveries.labels("delivered").inc()
            await self._settle(message, WebhookVerdict.DELIVERED)

    async def _retry_later(self, message: WebhookMessage) -> None:
        s = self.settings
        ceiling = min(s.webhook_backoff * 2 ** (message.attempt - 1), s.webhook_backoff_max)
        delay = ceiling / 2 + random.random() * ceiling / 2
        if await self._settle(message, WebhookVerdict.RETRY, due_at=time.time() + delay):
            metrics.webhook_deliveries.labels("retried").inc()
            asyncio.get_running_loop().call_later(delay, self._wake.set)

    async def _settle(
        self, message: WebhookMessage, verdict: WebhookVerdict, *, due_at: float = 0.0
    ) -> bool:
        try:
            return await self.queue.settle_webhook(message, verdict, due_at=due_at)
        except QueueUnavailable as error:
            # Its lease runs out and it is claimed again: at worst a second delivery.
            log.warning(
                "webhook delivery not settled (%s): it is tried again once its claim lapses",
                error, extra={"task_id": message.task_id},
            )  # fmt: skip
            return False

    async def _attempt(self, message: WebhookMessage, body: bytes) -> None:
        import httpx  # loaded by run() already, with the client

        assert self._http is not None
        key = self._keys.for_scope(message.scope)
        if key is None:
            # The api that took the task could sign it; this worker is configured otherwise.
            raise _Undelivered(
                "this worker has no secret to sign it with (WEBHOOK_KEY_SECRETS for the "
                "task's API key, or WEBHOOK_SECRET)"
            )
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
                "webhook-signature": signature(key, message.message_id, timestamp, body),
            }
            extensions = {"sni_hostname": host} if url.startswith("https") else {}
            try:
                answer = await self._http.post(
                    _pinned(url, address),
                    content=body,
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

    async def _dead_letter(self, message: WebhookMessage) -> None:
        if not await self._settle(message, WebhookVerdict.DEAD):
            return  # another sender holds it now, or it was settled already
        metrics.webhook_deliveries.labels("dead_lettered").inc()
        log.warning(
            "webhook dead-lettered after %d attempts: %s",
            message.attempt, message.last_error, extra={"task_id": message.task_id},
        )  # fmt: skip

    async def close(self, within: float) -> None:
        """Let the attempts under way end for up to `within` seconds; hand back the rest."""
        for recording in list(self._recording):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(recording, within)
        if self._attempts:
            await asyncio.wait(list(self._attempts), timeout=within)
        for attempt in list(self._attempts):
            attempt.cancel()
        if self._attempts:
            await asyncio.wait(list(self._attempts), timeout=_RELEASE_SECONDS + 1)
        if self._http is not None:
            await self._http.aclose()
