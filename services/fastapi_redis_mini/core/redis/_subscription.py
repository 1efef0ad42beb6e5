"""The pub/sub subscription that wakes long-polls and idle workers.

Owns Subscription: one Pub/Sub (on a cluster, sharded Pub/Sub) subscription per process to a
set of channels, one per partition, with the listener that keeps it subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from redis.asyncio import RedisCluster
from redis.asyncio.client import PubSub
from redis.exceptions import RedisClusterException, RedisError

from ._connect import Client
from ._errors import torn_down

log = logging.getLogger(__name__)


class Subscription:
    """One Pub/Sub subscription per process to a set of channels (one per partition).

    It wakes the long-polls waiting on a task (`watch`; messages carry task ids) or a worker
    waiting for new entries (`wait`). On a cluster the channels are shard channels
    (SSUBSCRIBE), each on the master of its partition.
    """

    def __init__(self, redis: Client, channels: Sequence[str], *, sharded: bool, name: str) -> None:
        self._redis = redis
        self._channels = list(channels)
        self._sharded = sharded
        self._name = name
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._announced = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name=f"{self._name}-listener")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), 5.0)

    def clear(self) -> None:
        self._announced.clear()

    async def wait(self, seconds: float) -> None:
        """Return once a message came since the last clear(), or after `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._announced.wait(), seconds)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        if self._listener is None:
            await self.start()
        event = asyncio.Event()
        self._waiters.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiters.get(task_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[task_id]

    def _heard(self, data: str) -> None:
        self._announced.set()
        if self._waiters:
            for task_id in data.split():
                for event in self._waiters.get(task_id, ()):
                    event.set()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub: PubSub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                if isinstance(self._redis, RedisCluster):
                    # A cluster client learns the slots on its first command; the pub/sub
                    # needs them to pick a node, and may come first.
                    await self._redis.initialize()
                if self._sharded:
                    await pubsub.ssubscribe(*self._channels)
                else:
                    await pubsub.subscribe(*self._channels)
                self._subscribed.set()
                backoff = 0.1
                while True:
                    if self._sharded:
                        # The cluster's pub/sub polls each node's connection in turn, for the
                        # timeout each: a short one keeps every shard's messages prompt.
                        message = await pubsub.get_sharded_message(  # type: ignore[attr-defined]
                            ignore_subscribe_messages=True, timeout=0.05
                        )
                    else:
                        message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] in ("message", "smessage"):
                        self._heard(message["data"])
            except Exception as error:
                # Whatever went wrong, subscribing again is all there is to do, so this loop
                # never ends on its own; meanwhile long-polls read the task every 5 s, and
                # workers read every partition once a second.
                self._subscribed.clear()
                if isinstance(error, (RedisError, RedisClusterException)) or torn_down(error):
                    log.warning("%s subscription failed (%s); retrying", self._name, error)
                else:
                    log.exception("%s listener failed; subscribing again", self._name)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            # A cancel landing inside a Redis read can be swallowed by the client: wait for
            # the listener a bounded time rather than forever.
            await asyncio.wait([self._listener], timeout=2)
            self._listener = None
