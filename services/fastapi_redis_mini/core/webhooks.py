"""Webhooks: what a delivery carries, how it is signed, and which addresses it may reach.

Deliveries follow the Standard Webhooks scheme: `webhook-id` (one per message, the same on
every retry of it), `webhook-timestamp` (seconds) and `webhook-signature`, `v1,` and the
base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` under a `whsec_<base64>` secret: the one
WEBHOOK_KEY_SECRETS gives the API key that submitted the task, else WEBHOOK_SECRET.

The guard against server-side request forgery: a webhook may reach only public addresses,
checked on the addresses its host resolves to (not its name) and again on every redirect.
Loopback, private, link-local (the cloud metadata service at 169.254.169.254 among them),
shared, reserved and multicast addresses are refused unless WEBHOOK_ALLOWED_HOSTS names the
host or a network holding the address.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .tenants import tenant_of_key

if TYPE_CHECKING:
    from .settings import Settings

MAX_URL_CHARS = 2048


class WebhookEvent(StrEnum):
    """What a task's webhook may be sent for (a submit's `webhook_events` picks them)."""

    START = "start"  # a worker started it
    PROGRESS = "progress"  # its handler reported progress
    OUTPUT = "output"  # its handler emitted partial output
    COMPLETED = "completed"  # it ended: DONE, FAILED or CANCELLED


class WebhookRefused(ValueError):  # noqa: N818 - a verdict, as the guard gives it
    """A webhook URL or address the guard does not allow; the message says why."""


def secret_key(secret: str) -> bytes:
    """The key of a `whsec_<base64>` secret; ValueError when it is not of that form."""
    if not secret.startswith("whsec_"):
        raise ValueError("must start with whsec_ (the Standard Webhooks form)")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("must hold at least 16 bytes of key")
    return key


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value for one delivery."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class SigningKeys:
    """The key that signs each task's deliveries, by the task's scope (its tenant id).

    A task carries its scope, not its API key, so WEBHOOK_KEY_SECRETS is turned into scopes
    here, in each process, as the api derives them (with TENANT_SECRET): the secrets
    themselves never reach Redis.
    """

    def __init__(self, default: bytes | None, by_scope: Mapping[str, bytes]) -> None:
        self.default = default
        self.by_scope = dict(by_scope)

    @classmethod
    def from_settings(cls, settings: Settings) -> SigningKeys:
        default = settings.webhook_secret
        return cls(
            secret_key(default.get_secret_value()) if default is not None else None,
            {
                tenant_of_key(key.get_secret_value(), settings.tenant_secret): secret_key(
                    secret.get_secret_value()
                )
                for key, secret in settings.webhook_key_secrets
            },
        )

    @property
    def any(self) -> bool:
        """Whether some delivery can be signed here."""
        return self.default is not None or bool(self.by_scope)

    def for_scope(self, scope: str) -> bytes | None:
        """The key of the scope's API key (WEBHOOK_KEY_SECRETS), else WEBHOOK_SECRET's."""
        return self.by_scope.get(scope, self.default)


class AllowedHosts:
    """WEBHOOK_ALLOWED_HOSTS: host names (exact, case-insensitive) and networks (CIDRs)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in (e.strip() for e in entries):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry.lower())

    def allows(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return host.lower() in self.names or any(address in n for n in self.networks)


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def check_address(host: str, address: str, allowed: AllowedHosts) -> None:
    """Raise WebhookRefused unless `host`, resolved to `address`, may be reached."""
    parsed = ipaddress.ip_address(address.split("%", 1)[0])
    if not _public(parsed) and not allowed.allows(host, parsed):
        raise WebhookRefused(
            f"{host} resolves to {parsed}, a non-public address (WEBHOOK_ALLOWED_HOSTS opens it)"
        )


def check_url(url: str, allowed: AllowedHosts) -> tuple[str, int]:
    """The URL's host and port, once its form is right and a literal address is allowed.

    A host name is checked after resolution, at delivery (see check_address).
    """
    if len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise WebhookRefused(f"not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("must be an http or https URL")
    host = parts.hostname
    if not host:
        raise WebhookRefused("must name a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("must not carry credentials")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        check_address(host, str(literal), allowed)
    return host, port or (443 if parts.scheme == "https" else 80)
