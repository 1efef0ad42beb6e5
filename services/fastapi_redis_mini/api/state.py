"""What the api's routes share, built once per process: one typed ApiState, one accessor."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import SecretStr

from ..core.queue import TaskQueue
from ..core.redis import RedisTaskQueue, connect
from ..core.redis.console import ConsoleStore
from ..core.settings import Settings
from ..core.tenants import tenant_of_key
from ..core.webhooks import SigningKeys
from . import metrics
from .errors import BacklogFullError, TooManyWaitsError

_REJECTED = metrics.tasks_submitted.labels("rejected")


class ApiKeys:
    """The configured API keys, kept only as SHA-256 digests, and the tenant each one names
    (core/tenants.py)."""

    def __init__(
        self,
        keys: Iterable[SecretStr],
        secret: SecretStr | None = None,
        high_priority: Iterable[SecretStr] = (),
    ) -> None:
        def tenant(value: str) -> str:
            return tenant_of_key(value, secret)

        values = [key.get_secret_value() for key in keys]
        self._digests = tuple(self._digest(value) for value in values)
        self._tenants = {self._digest(value): tenant(value) for value in values}
        # PRIORITY_HIGH_KEYS, as the tenants those keys name; empty: every tenant.
        self._high_priority = frozenset(tenant(key.get_secret_value()) for key in high_priority)

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def tenant(self, presented: str) -> str | None:
        """The tenant of a presented key (a prefix of its digest), or None if it is not one.

        The digest is compared with hmac.compare_digest against every configured key, so
        neither the comparison nor the loop leaks which key matched, or how much of one did.
        """
        candidate = self._digest(presented)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return self._tenants[candidate] if matched else None

    def may_submit_high(self, tenant: str) -> bool:
        """Whether a tenant may use the high lane (PRIORITY_HIGH_KEYS; unset: every one)."""
        return not self._high_priority or tenant in self._high_priority


class BacklogGate:
    """Refuses new work while the consumer group's lag is above MAX_BACKLOG.

    The lag is read at most once a second per process, so the check costs one Redis call a
    second rather than one per request.
    """

    def __init__(self, limit: int, refresh_seconds: float = 1.0) -> None:
        self.limit = limit
        self.refresh_seconds = refresh_seconds
        self._lag = 0
        self._read_at = float("-inf")

    async def check(self, queue: TaskQueue) -> None:
        if self.limit <= 0:
            return
        now = time.monotonic()
        if now - self._read_at >= self.refresh_seconds:
            self._read_at = now
            self._lag = (await queue.stats()).backlog
        if self._lag > self.limit:
            _REJECTED.inc()
            raise BacklogFullError(
                f"backlog of {self._lag} tasks is above MAX_BACKLOG={self.limit}; retry later"
            )


class WaitSlots:
    """Caps the requests one API key may hold open waiting (long-polls, event streams) in this
    process at MAX_WAITS_PER_KEY: each holds a subscription and a connection, and 800 from
    one key slowed every other key's submits a hundredfold."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[str] = Counter()

    @contextmanager
    def slot(self, scope: str) -> Iterator[None]:
        """Hold one of `scope`'s slots for the block; 429 when it has none left."""
        if self.limit and self._held[scope] >= self.limit:
            raise TooManyWaitsError(
                f"this API key already holds {self.limit} waiting requests "
                "(MAX_WAITS_PER_KEY); retry once one ends"
            )
        self._held[scope] += 1
        try:
            yield
        finally:
            self._held[scope] -= 1
            if not self._held[scope]:
                del self._held[scope]

    def held(self, scope: str) -> int:
        return self._held[scope]


@dataclass(frozen=True, slots=True)
class ApiState:
    settings: Settings
    queue: TaskQueue
    api_keys: ApiKeys
    backlog: BacklogGate
    waits: WaitSlots
    # Which key signs a scope's webhook deliveries; a webhook without one is refused.
    webhook_keys: SigningKeys
    tracing: bool
    # Checks a submit's params with the Params model of TASK_HANDLER, if it declares one.
    check_params: Callable[[dict[str, Any]], None] | None
    # The console's reads and actions, with CONSOLE_ENABLED.
    console: ConsoleStore | None = None

    @classmethod
    @asynccontextmanager
    async def opened(
        cls,
        settings: Settings,
        *,
        tracing: bool,
        check_params: Callable[[dict[str, Any]], None] | None,
    ) -> AsyncIterator[ApiState]:
        """The state for the app's lifespan: the queue opened on entry and closed on exit."""
        queue = RedisTaskQueue(connect(settings), settings)
        try:
            await queue.open()
            yield cls(
                settings=settings,
                queue=queue,
                api_keys=ApiKeys(
                    settings.api_keys, settings.tenant_secret, settings.priority_high_keys
                ),
                backlog=BacklogGate(settings.max_backlog),
                waits=WaitSlots(settings.max_waits_per_key),
                webhook_keys=SigningKeys.from_settings(settings),
                tracing=tracing,
                check_params=check_params,
                console=ConsoleStore(queue) if settings.console_enabled else None,
            )
        finally:
            await queue.close()


def api_state(request: Request) -> ApiState:
    """The ApiState of the app serving `request` (the app's lifespan sets it)."""
    state: ApiState = request.app.state.api
    return state
