"""Tenant ids: the `scope` a task is stored under, derived from the API key that submitted it.

A tenant id is the first 16 hex digits of HMAC-SHA256(TENANT_SECRET, key): without the
secret, a copy of Redis gives nothing to test guessed keys against. Without TENANT_SECRET it
is those of SHA-256(key), the ids of earlier releases (docs/security.md: migrating).
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr


def tenant_of_key(key: str, tenant_secret: SecretStr | None) -> str:
    """The tenant id (a task's scope) of an API key."""
    mac = (
        hmac.new(tenant_secret.get_secret_value().encode(), key.encode(), hashlib.sha256)
        if tenant_secret is not None
        else hashlib.sha256(key.encode())
    )
    return mac.hexdigest()[:16]
