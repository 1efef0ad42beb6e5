"""Every Redis key name the service uses, built in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import Settings


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix, so two deployments can share a Redis."""

    prefix: str
    queue: str
    group: str

    @classmethod
    def from_settings(cls, settings: Settings, *, cluster: bool = False) -> Keys:
        """On a Redis Cluster every key starts with one hash tag, `{<prefix><queue>}:`, so all
        of them share a slot: each script touches keys of that slot only. On a single server
        the names stay as they were, so no migration is needed."""
        prefix = settings.key_prefix
        if cluster:
            prefix = f"{{{prefix}{settings.queue_key}}}:"
        return cls(prefix=prefix, queue=settings.queue_key, group=settings.consumer_group)

    def task(self, task_id: str) -> str:
        """Hash holding one task's status, request, result and timestamps."""
        return f"{self.prefix}task:{task_id}"

    def cache(self, signature: str, scope: str = "") -> str:
        """String holding a finished result, shared by identical requests of one scope."""
        return (
            f"{self.prefix}cache:{scope}:{signature}"
            if scope
            else f"{self.prefix}cache:{signature}"
        )

    def idempotency(self, key: str, scope: str = "") -> str:
        """String mapping a client's Idempotency-Key to the task it created."""
        return f"{self.prefix}idempotency:{scope}:{key}"

    def submit_quota(self, scope: str) -> str:
        """Hash holding one API key's token bucket (tokens, refilled_at); gone once full."""
        return f"{self.prefix}quota:{scope}"

    def unfinished(self, scope: str) -> str:
        """Sorted set of one API key's tasks not final yet, scored by when each expires (ms)."""
        return f"{self.prefix}unfinished:{scope}"

    @property
    def stream(self) -> str:
        """The stream workers consume; entries carry only the task id."""
        return f"{self.prefix}{self.queue}"

    @property
    def dead_letter(self) -> str:
        """Stream of entries that reached the delivery limit."""
        return f"{self.prefix}{self.queue}:dead"

    @property
    def retries(self) -> str:
        """Sorted set of tasks waiting out a retry backoff, scored by when they are due."""
        return f"{self.prefix}{self.queue}:retry"

    @property
    def probe(self) -> str:
        """String the readiness probes write, to learn whether Redis accepts writes."""
        return f"{self.prefix}{self.queue}:probe"

    @property
    def events(self) -> str:
        """Pub/Sub channel announcing each task that reached a final status."""
        return f"{self.prefix}{self.queue}:events"
