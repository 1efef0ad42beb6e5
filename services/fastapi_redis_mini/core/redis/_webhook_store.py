"""The durable webhook deliveries of RedisTaskQueue: queued, leased, settled or dead.

Owns WebhookStore, a base of RedisTaskQueue: the store a webhook sender works from, one per
partition (the deliveries by when each is due, their messages, and the stream of those that
failed for good; see keys.py). enqueue_webhooks adds deliveries; claim_webhooks leases due
ones from every partition, starting at a turn that moves on; settle_webhook records an
attempt's verdict; webhook_dead_letters reads the deliveries that gave up. How a message is
kept is _webhook_messages.py's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis.commands.core import AsyncScript

from ..queue import DeadLetter, QueueUnavailable, WebhookMessage, WebhookVerdict
from ._base import QueueBase, _translated
from ._replies import _text
from ._webhook_messages import decode, encode


class WebhookStore(QueueBase):
    """RedisTaskQueue's webhook deliveries (a base class, never made on its own)."""

    # Set by RedisTaskQueue.__init__.
    _webhook_enqueue_script: AsyncScript
    _webhook_claim_script: AsyncScript
    _webhook_settle_script: AsyncScript
    _webhook_turn: int  # the partition the next claim of deliveries starts at

    @_translated
    async def enqueue_webhooks(self, messages: Sequence[WebhookMessage]) -> None:
        if not messages:
            return
        groups = self._by_partition([m.task_id for m in messages])
        now = repr(time.time())
        calls = []
        for index, positions in groups.items():
            keys = self.partitions.all[index]
            args: list[Any] = [now]
            for i in positions:
                args += (messages[i].message_id, encode(messages[i]))
            calls.append(([keys.webhooks_due, keys.webhook_messages], args))
        await self._call_each(self._webhook_enqueue_script, calls)

    @_translated
    async def claim_webhooks(self, count: int, lease: float) -> list[WebhookMessage]:
        # Every partition is asked for a share, starting at a turn that moves on, so one
        # partition's backlog does not keep the others' deliveries waiting.
        parts = self.partitions.all
        turn = self._webhook_turn % len(parts)
        self._webhook_turn += 1
        ordered = parts[turn:] + parts[:turn]
        if len(parts) <= count:
            shares = [(keys, count // len(parts)) for keys in ordered]
        else:
            shares = [(keys, 1) for keys in ordered[:count]]
        now = repr(time.time())
        calls = [([k.webhooks_due, k.webhook_messages], [now, lease, n]) for k, n in shares]
        replies = await self._call_each_isolated(self._webhook_claim_script, calls)
        messages = []
        for (keys, _), reply in zip(shares, replies, strict=True):
            if isinstance(reply, QueueUnavailable):
                continue  # that partition's deliveries wait; the others' are sent
            for i in range(0, len(reply), 3):
                message = decode(reply[i], int(reply[i + 1]), _text(reply[i + 2]))
                message.partition = keys.index
                messages.append(message)
        return messages

    @_translated
    async def settle_webhook(
        self, message: WebhookMessage, verdict: WebhookVerdict, *, due_at: float = 0.0
    ) -> bool:
        keys = self.partitions.all[message.partition]
        reply = await self._webhook_settle_script(
            keys=[keys.webhooks_due, keys.webhook_messages, keys.webhooks_dead],
            args=[message.message_id, message.attempt, verdict.value, repr(due_at),
                  message.last_error[:500], repr(time.time()), self.settings.dead_letter_maxlen],
        )  # fmt: skip
        return _text(reply) == "settled"

    @_translated
    async def webhook_dead_letters(self, count: int) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        for keys in self.partitions.all:
            entries: list[tuple[str, dict[str, str]]] = await self.redis.xrevrange(  # type: ignore[assignment]
                keys.webhooks_dead, count=count
            )
            letters += [DeadLetter(entry_id, f.get("task_id", ""), f) for entry_id, f in entries]
        return letters
