"""The webhook guard and signature, without a network: which addresses a delivery may reach."""

from __future__ import annotations

import base64

import pytest

from fastapi_redis_mini.api.state import ApiKeys
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.core.webhooks import (
    AllowedHosts,
    SigningKeys,
    WebhookRefused,
    check_address,
    check_url,
    secret_key,
    signature,
)
from fastapi_redis_mini_client.webhooks import sign

NOBODY = AllowedHosts(())


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "0.0.0.0", "224.0.0.1", "::1", "fd00::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(WebhookRefused, match="non-public"):
        check_address("receiver.example", address, NOBODY)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_public_addresses_pass(address: str) -> None:
    check_address("receiver.example", address, NOBODY)


def test_allowed_hosts_open_a_name_or_a_network_and_nothing_else() -> None:
    allowed = AllowedHosts(["Receiver.Internal", "10.0.0.0/8"])
    check_address("receiver.internal", "192.168.0.5", allowed)
    check_address("other.internal", "10.20.30.40", allowed)
    with pytest.raises(WebhookRefused):
        check_address("other.internal", "192.168.0.5", allowed)


def test_a_url_is_checked_for_its_form_and_a_literal_address() -> None:
    assert check_url("https://hooks.example/x?y=1", NOBODY) == ("hooks.example", 443)
    assert check_url("http://hooks.example:8080/", NOBODY) == ("hooks.example", 8080)
    for bad in (
        "hooks.example/x",
        "http:///path",
        "http://hooks.example:99999/",
        "http://10.0.0.1/",
    ):
        with pytest.raises(WebhookRefused):
            check_url(bad, NOBODY)


def test_the_signature_is_what_the_clients_verifier_expects() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    assert signature(secret_key(secret), "msg_1", 1700000000, b"{}") == sign(
        secret, "msg_1", 1700000000, b"{}"
    )
    for bad in ("k" * 24, "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError, match=r"whsec_|16 bytes"):
            secret_key(bad)


def test_a_scope_whose_api_key_has_a_secret_signs_with_it_and_any_other_with_the_default() -> None:
    default = "whsec_" + base64.b64encode(b"the service's own secret").decode()
    own = "whsec_" + base64.b64encode(b"the alpha key's own secret").decode()
    settings = Settings(
        api_keys="alpha,beta",
        tenant_secret="tenant secret of 16+ chars",
        webhook_secret=default,
        webhook_key_secrets=f"alpha={own}",
    )
    keys = SigningKeys.from_settings(settings)
    # The scope a task carries is the tenant the api derives from the key that submitted it.
    tenants = ApiKeys(settings.api_keys, settings.tenant_secret)
    alpha, beta = tenants.tenant("alpha"), tenants.tenant("beta")
    assert alpha is not None
    assert beta is not None
    assert keys.for_scope(alpha) == secret_key(own)
    assert keys.for_scope(beta) == secret_key(default)
    assert keys.for_scope("") == secret_key(default)

    only_own = SigningKeys.from_settings(settings.model_copy(update={"webhook_secret": None}))
    assert (only_own.any, only_own.for_scope(alpha), only_own.for_scope(beta)) == (
        True, secret_key(own), None,
    )  # fmt: skip
    # Without TENANT_SECRET the tenants are other ids: the worker needs the api's secret.
    plain = settings.model_copy(update={"tenant_secret": None})
    assert SigningKeys.from_settings(plain).for_scope(alpha) == secret_key(default)
    assert not SigningKeys.from_settings(Settings(_env_file=None)).any
