"""Every Redis key name the service uses, built in one place: per partition, and the layout
that says which partition a task, a submit or a task id belongs to."""

from __future__ import annotations

import re
import uuid
import zlib
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ..models import PRIORITIES
from ..settings import Settings

# On a cluster, enough partitions that every master of a 3- to 8-master cluster serves some,
# and few enough that an idle worker's sweep of them all stays one small pipeline per node.
CLUSTER_PARTITIONS = 16

_PARTITIONED_ID = re.compile(r"^([0-9]{1,3})-([0-9a-f]{32})$")


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names of one partition, under one prefix, so two deployments can share a Redis.

    `prefix` ends in the partition's hash tag on a cluster (and whenever there is more than
    one partition), so every key of the partition shares one slot.
    """

    prefix: str
    queue: str
    group: str
    index: int = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, cluster: bool = False) -> Keys:
        """The keys of a deployment with a single partition.

        On a Redis Cluster every key starts with one hash tag, `{<prefix><queue>}:`, so all
        of them share a slot: each script touches keys of that slot only. On a single server
        the names stay as they were, so no migration is needed."""
        prefix = settings.key_prefix
        if cluster:
            prefix = f"{{{prefix}{settings.queue_key}}}:"
        return cls(prefix=prefix, queue=settings.queue_key, group=settings.consumer_group)

    def task(self, task_id: str) -> str:
        """Hash holding one task's status, request, result and timestamps."""
        return f"{self.prefix}task:{task_id}"

    def task_events(self, task_id: str) -> str:
        """Stream of one task's progress and output reports, capped, expiring with the task."""
        return f"{self.prefix}task:{task_id}:events"

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

    def inflight(self, signature: str, scope: str = "") -> str:
        """String naming the task PENDING or RUNNING for a request of one scope (single-flight)."""
        return f"{self.prefix}inflight:{scope}:{signature}"

    def lane(self, priority: str) -> str:
        """Sorted set of the tasks waiting in one priority lane, in the order they are taken."""
        return f"{self.prefix}{self.queue}:lane:{priority}"

    @property
    def lanes(self) -> tuple[str, ...]:
        """The lanes' sorted sets, highest priority first."""
        return tuple(self.lane(p) for p in PRIORITIES)

    @property
    def lane_turns(self) -> str:
        """Hash of the lanes' bookkeeping: each lane's and each API key's last turn, and the
        count of tasks taken (for the starvation guard)."""
        return f"{self.prefix}{self.queue}:lane-turns"

    def submit_quota(self, scope: str) -> str:
        """Hash holding one API key's token bucket (tokens, refilled_at); gone once full."""
        return f"{self.prefix}quota:{scope}"

    def unfinished(self, scope: str) -> str:
        """Sorted set of one API key's tasks not final yet, scored by when each expires (ms)."""
        return f"{self.prefix}unfinished:{scope}"

    def stored_bytes(self, scope: str) -> str:
        """Hash of the bytes one API key's stored tasks hold, per expiry bucket (submit.lua)."""
        return f"{self.prefix}stored:{scope}"

    @property
    def stream(self) -> str:
        """The stream workers consume; entries carry only the task id."""
        return f"{self.prefix}{self.queue}"

    @property
    def dead_letter(self) -> str:
        """Stream of entries that reached the delivery limit."""
        return f"{self.prefix}{self.queue}:dead"

    @property
    def webhooks_due(self) -> str:
        """Sorted set of the webhook deliveries waiting to be sent, by when each is due next."""
        return f"{self.prefix}{self.queue}:webhooks:due"

    @property
    def webhook_messages(self) -> str:
        """Hash of the webhook deliveries not settled yet: id -> message, and per id its
        attempts (`<id>:attempts`) and last error (`<id>:error`)."""
        return f"{self.prefix}{self.queue}:webhooks:messages"

    @property
    def webhooks_dead(self) -> str:
        """Stream of webhook deliveries that failed for good (WEBHOOK_MAX_ATTEMPTS)."""
        return f"{self.prefix}{self.queue}:webhooks:dead"

    @property
    def retries(self) -> str:
        """Sorted set of tasks waiting out a retry backoff or a delayed start, scored by when
        they are due."""
        return f"{self.prefix}{self.queue}:retry"

    @property
    def recent(self) -> str:
        """List of the newest task ids the partition queued, newest first (submit.lua caps it)."""
        return f"{self.prefix}{self.queue}:recent"

    def finished(self, status: str) -> str:
        """List of the newest task ids that ended with `status` (done, failed, cancelled)."""
        return f"{self.prefix}{self.queue}:finished:{status.lower()}"

    def counts(self, bucket: int) -> str:
        """Hash counting the outcomes written in one ten-second bucket (unix time // 10)."""
        return f"{self.prefix}{self.queue}:counts:{bucket}"

    @property
    def layout(self) -> str:
        """String: how the queue is laid out (partitions, lanes), as the api or worker that
        started last recorded it; under the single-partition names, the same whatever the
        layout."""
        return f"{self.prefix}{self.queue}:layout"

    @property
    def probe(self) -> str:
        """String the readiness probes write, to learn whether Redis accepts writes."""
        return f"{self.prefix}{self.queue}:probe"

    @property
    def events(self) -> str:
        """Pub/Sub channel announcing each task of the partition that reached a final status."""
        return f"{self.prefix}{self.queue}:events"

    @property
    def reports(self) -> str:
        """Pub/Sub channel announcing tasks of the partition that started or reported."""
        return f"{self.prefix}{self.queue}:reports"

    @property
    def work(self) -> str:
        """Pub/Sub channel announcing new entries in the partition's stream (partitions > 1)."""
        return f"{self.prefix}{self.queue}:work"


def partition_count(settings: Settings, *, cluster: bool) -> int:
    """QUEUE_PARTITIONS, or its default: 1 on a single server (today's key names and task ids),
    CLUSTER_PARTITIONS on a cluster, so the queue spreads over its masters. Per-key quotas
    count in one place, and priority lanes order in one place, so with either a cluster's
    default is 1 too (with several partitions, each orders its own lanes)."""
    if settings.queue_partitions is not None:
        return settings.queue_partitions
    one_place = settings.quotas or settings.priority_lanes
    return CLUSTER_PARTITIONS if cluster and not one_place else 1


def layout(settings: Settings, *, cluster: bool) -> str:
    """How the queue is laid out: what every api and worker using it must agree on, as it is
    recorded in Redis (Keys.layout). Processes of another layout would read and write other
    keys: a worker of fewer partitions never sees the others' tasks, and a worker without
    lanes never takes the tasks waiting in them."""
    lanes = "true" if settings.priority_lanes else "false"
    return f"partitions={partition_count(settings, cluster=cluster)} priority_lanes={lanes}"


def layout_reasons(settings: Settings, *, cluster: bool) -> str:
    """Which settings gave this process its layout, for the message of a mismatch."""
    count = partition_count(settings, cluster=cluster)
    if settings.queue_partitions is not None:
        partitions = f"QUEUE_PARTITIONS={settings.queue_partitions}"
    elif not cluster:
        partitions = "QUEUE_PARTITIONS unset: 1 on a single server"
    elif count == 1:
        why = (
            "the per-key quotas on (SUBMIT_RATE_PER_KEY, MAX_UNFINISHED_PER_KEY or "
            "MAX_STORED_BYTES_PER_KEY above 0)"
            if settings.quotas
            else "PRIORITY_LANES=true"
        )
        partitions = f"QUEUE_PARTITIONS unset and {why}: 1 on a cluster"
    else:
        partitions = (
            "QUEUE_PARTITIONS unset, the per-key quotas off and PRIORITY_LANES=false: "
            f"{count} on a cluster"
        )
    if "PRIORITY_LANES" in partitions:
        return partitions
    return f"{partitions}; PRIORITY_LANES={'true' if settings.priority_lanes else 'false'}"


def _hash_tag(base: str, index: int, count: int) -> str:
    """A hash tag for partition `index` whose slot lies in the index-th of `count` equal slot
    ranges. A cluster made by `redis-cli --cluster create` gives each master one contiguous
    range of slots, so partitions spaced evenly over the slots spread evenly over the masters,
    whatever KEY_PREFIX and QUEUE_KEY are."""
    low = index * REDIS_CLUSTER_HASH_SLOTS // count
    high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count
    tag = f"{base}:{index}"
    attempt = 0
    while not low <= key_slot(tag.encode()) < high:
        attempt += 1
        tag = f"{base}:{index}.{attempt}"
    return tag


@dataclass(frozen=True, slots=True)
class Partitions:
    """The queue's partitions, and which one a task, a submit or a task id belongs to.

    With one partition, key names and task ids are exactly those of an unpartitioned queue.
    With more, partition i's keys all carry its own hash tag, and a task id names its
    partition (`<i>-<32 hex>`), so a GET or DELETE goes straight to it.
    """

    all: tuple[Keys, ...]
    # SINGLE_FLIGHT: identical requests must meet in one partition, whatever their keys.
    by_signature: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, *, cluster: bool = False) -> Partitions:
        count = partition_count(settings, cluster=cluster)
        if count == 1:
            return cls((Keys.from_settings(settings, cluster=cluster),), settings.single_flight)
        base = f"{settings.key_prefix}{settings.queue_key}"
        return cls(
            tuple(
                Keys(
                    prefix=f"{{{_hash_tag(base, index, count)}}}:",
                    queue=settings.queue_key,
                    group=settings.consumer_group,
                    index=index,
                )
                for index in range(count)
            ),
            settings.single_flight,
        )

    def __len__(self) -> int:
        return len(self.all)

    def new_task_id(self, keys: Keys) -> str:
        """122 random bits (UUID4), so task ids cannot be guessed; prefixed with the partition
        when there are several."""
        random_part = uuid.uuid4().hex
        return random_part if len(self.all) == 1 else f"{keys.index}-{random_part}"

    def of_task(self, task_id: str) -> Keys | None:
        """The partition a task id names, or None when the id names none of these."""
        if len(self.all) == 1:
            return self.all[0] if "-" not in task_id else None
        match = _PARTITIONED_ID.fullmatch(task_id)
        if match is None or int(match[1]) >= len(self.all):
            return None
        return self.all[int(match[1])]

    def of_submit(self, signature: str, scope: str, idempotency_key: str | None) -> Keys:
        """Where a submit is decided: by its signature, so the cache lookup, the single-flight
        key and the task it may create share one slot, and identical requests meet there
        whatever their Idempotency-Keys. Without single-flight, a submit with a key is
        decided by the key instead, so a key names exactly one task whatever the bodies sent
        with it (with single-flight, a key sent with another body is refused only when that
        body's signature shares the first one's partition)."""
        if len(self.all) == 1:
            return self.all[0]
        keyed = idempotency_key is not None and not self.by_signature
        routed_by = f"{scope}\0{idempotency_key}" if keyed else signature
        return self.all[zlib.crc32(routed_by.encode()) % len(self.all)]
