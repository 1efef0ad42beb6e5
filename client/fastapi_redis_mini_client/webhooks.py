"""Checking that a webhook delivery came from the service (the Standard Webhooks scheme).

The service signs `{webhook-id}.{webhook-timestamp}.{body}` with HMAC-SHA256 under the
secret, given in its `whsec_<base64>` form, and sends `v1,<base64 signature>` in the
`webhook-signature` header (several, space-separated, while a secret is being rotated).

Deliveries are at-least-once: the same delivery may arrive twice (say, when the worker that
sent it died before recording that it got through). Its `webhook-id` and body are the same
each time, so a receiver keeps the ids it has handled and ignores one it has seen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

# A delivery older or newer than this is refused, so a captured one cannot be replayed later.
TOLERANCE_SECONDS = 300


class WebhookVerificationError(Exception):
    """The delivery is not one the service signed with this secret, or it is too old."""


def secret_bytes(secret: str) -> bytes:
    """The key a `whsec_<base64>` secret stands for."""
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one delivery: `v1,<base64 HMAC-SHA256>`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """The delivery's JSON payload, once its signature and timestamp check out.

    `headers` may be any mapping with the delivery's headers (case-insensitive names are
    looked up in lower case); `body` is the raw request body, before any JSON parsing.
    Raises WebhookVerificationError otherwise.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        message_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        signatures = lowered["webhook-signature"].split()
    except (KeyError, ValueError):
        raise WebhookVerificationError("missing or malformed webhook headers") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("the delivery's timestamp is outside the tolerance")
    expected = sign(secret, message_id, timestamp, body)
    if not any(hmac.compare_digest(expected, given) for given in signatures):
        raise WebhookVerificationError("no signature matches")
    return json.loads(body)
