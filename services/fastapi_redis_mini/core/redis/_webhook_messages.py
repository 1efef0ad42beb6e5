"""How a webhook delivery is kept in Redis: one JSON message per id, written once.

A message is `{id, task_id, scope, url, event, at, data}`, with `result` beside `data` when a
script wrote it (a cache hit's result, kept as the JSON text it was cached as, so Lua never has
to re-encode it). The scope, the task's tenant, tells a sender which key signs it. Its attempts
and last error live in fields of their own (see keys.py), so a message is never rewritten and
its body is the same on every attempt.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..models import TaskCreate
from ..queue import WebhookMessage
from ..webhooks import WebhookEvent


def encode(message: WebhookMessage) -> bytes:
    return orjson.dumps({
        "id": message.message_id,
        "task_id": message.task_id,
        "scope": message.scope,
        "url": message.url,
        "event": message.event,
        "at": message.timestamp,
        "data": message.data,
    })  # fmt: skip


def decode(raw: str | bytes, attempt: int, last_error: str) -> WebhookMessage:
    fields: dict[str, Any] = orjson.loads(raw)
    data = fields["data"] if isinstance(fields["data"], dict) else {}  # cjson: {} for []
    if "result" in fields:
        data["result"] = orjson.loads(fields["result"])
    return WebhookMessage(
        message_id=fields["id"],
        task_id=fields["task_id"],
        url=fields["url"],
        event=fields["event"],
        timestamp=float(fields["at"]),
        data=data,
        # A message recorded before messages carried a scope is signed as the default's.
        scope=fields.get("scope", ""),
        attempt=attempt,
        last_error=last_error,
    )


def completed_url(request: TaskCreate) -> str | None:
    """The webhook a request's `completed` delivery goes to, if it asked for one."""
    if request.webhook is None:
        return None
    events = request.webhook_events
    # No events named is the default, `completed` only, as the worker reads it.
    return request.webhook if not events or WebhookEvent.COMPLETED in events else None
