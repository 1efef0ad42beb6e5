"""Configuration: defaults from the design, and bad values stopped at start with a clear line."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from fastapi_redis_mini.core.settings import Settings, SettingsError, get_settings

from ..conftest import QUOTAS_OFF


def test_defaults_match_the_design() -> None:
    settings = Settings(_env_file=None)
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.queue_key == "task_stream"
    assert settings.cache_ttl == 600
    assert settings.max_concurrency == 5
    assert settings.result_expiry == 86400


def test_api_keys_are_split_on_commas_and_never_shown() -> None:
    settings = Settings(api_keys=" alpha, beta ,,")
    assert [key.get_secret_value() for key in settings.api_keys] == ["alpha", "beta"]
    assert "alpha" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAX_CONCURRENCY", "0"),
        ("HANDLER_THREADS", "0"),
        ("LOOP_BLOCK_LIMIT", "0"),
        ("LIVENESS_GRACE", "-1"),
        ("REDIS_URL", "http://localhost:6379"),
        ("REDIS_URL", "redis://localhost:notaport/0"),
        ("REDIS_URL", "redis://localhost:6379/0?ssl_cert_reqs=required"),
        ("CACHE_TTL", "-5"),
        ("TASK_TIMEOUT", "abc"),
        ("LOG_FORMAT", "xml"),
        ("DOCS_ENABLED", "maybe"),
        ("SUBMIT_RATE_PER_KEY", "-1"),
        ("SUBMIT_RATE_PER_KEY", "nan"),
        ("SUBMIT_BURST_PER_KEY", "0"),
        ("MAX_UNFINISHED_PER_KEY", "-1"),
        ("DURABLE_ACKS", "always"),
        ("DURABLE_ACK_TIMEOUT", "5"),  # not below REDIS_SOCKET_TIMEOUT (2)
        ("QUEUE_PARTITIONS", "0"),
        ("QUEUE_PARTITIONS", "257"),
        ("QUEUE_PARTITIONS", "four"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    with pytest.raises(SettingsError) as raised:
        get_settings()
    get_settings.cache_clear()
    message = str(raised.value)
    assert variable in message
    assert "\n" not in message


def test_limits_that_contradict_each_other_are_refused() -> None:
    with pytest.raises(ValueError, match="MAX_TASK_DURATION"):
        Settings(max_task_duration=90, task_timeout=60)
    # A start renews a task's expiry only past half of it: a run must fit in the other half.
    with pytest.raises(ValueError, match="TASK_TIMEOUT must be at most half of RESULT_EXPIRY"):
        Settings(task_timeout=60, max_task_duration=10, result_expiry=100)
    assert Settings(task_timeout=50, max_task_duration=10, result_expiry=100).task_timeout == 50
    # A key's quota is counted in one place; several partitions would need it in several.
    with pytest.raises(ValueError, match="QUEUE_PARTITIONS above 1 cannot be combined"):
        Settings(queue_partitions=4, max_unfinished_per_key=3)
    assert Settings(queue_partitions=1, max_unfinished_per_key=3).queue_partitions == 1


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fastapi_redis_mini.api", "fastapi_redis_mini.worker"])
def test_a_service_with_a_bad_value_exits_at_once_with_one_line(module: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", module],
        env={"MAX_CONCURRENCY": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert "MAX_CONCURRENCY" in lines[0]
    assert "Traceback" not in completed.stderr


def test_priority_high_keys_must_be_api_keys() -> None:
    settings = Settings(api_keys="alpha,beta", priority_high_keys=" beta ,")
    assert [key.get_secret_value() for key in settings.priority_high_keys] == ["beta"]
    settings.check_api()
    with pytest.raises(SettingsError, match="PRIORITY_HIGH_KEYS must name keys of API_KEYS"):
        Settings(api_keys="alpha", priority_high_keys="gamma").check_api()


KEY_SECRET = "whsec_" + base64.b64encode(b"one API key's signing secret").decode()


def test_webhook_key_secrets_pair_api_keys_with_secrets_that_are_never_shown() -> None:
    # A key may end with '=' (base64): the secret starts at the last `=whsec_`.
    settings = Settings(
        api_keys="alpha,beta=", webhook_key_secrets=f" alpha={KEY_SECRET} ,beta=={KEY_SECRET},"
    )
    pairs = [(k.get_secret_value(), s.get_secret_value()) for k, s in settings.webhook_key_secrets]
    assert pairs == [("alpha", KEY_SECRET), ("beta=", KEY_SECRET)]
    assert "alpha" not in repr(settings)
    assert KEY_SECRET.removeprefix("whsec_") not in repr(settings)
    settings.check_api()
    with pytest.raises(SettingsError, match="WEBHOOK_KEY_SECRETS must name keys of API_KEYS"):
        Settings(api_keys="alpha", webhook_key_secrets=f"gamma={KEY_SECRET}").check_api()
    with pytest.raises(SettingsError, match="WEBHOOK_KEY_SECRETS must name keys of API_KEYS"):
        Settings(webhook_key_secrets=f"alpha={KEY_SECRET}").check_api()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("alpha", "entry 1 is not of the form API_KEY=whsec_<base64>"),
        (f"alpha={KEY_SECRET.removeprefix('whsec_')}", "entry 1 is not of the form"),
        (f"={KEY_SECRET}", "entry 1 is not of the form"),
        (f"alpha={KEY_SECRET},beta=whsec_secret!", "entry 2's secret must be whsec_ followed by"),
        ("alpha=whsec_" + base64.b64encode(b"too short").decode(), "at least 16 bytes"),
        (f"alpha={KEY_SECRET},alpha={KEY_SECRET}", "entry 2 names an API key an earlier entry"),
    ],
)
def test_a_bad_webhook_key_secret_names_the_variable_and_shows_neither_key_nor_secret(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("WEBHOOK_KEY_SECRETS", value)
    get_settings.cache_clear()
    with pytest.raises(SettingsError) as raised:
        get_settings()
    get_settings.cache_clear()
    message = str(raised.value)
    assert message.startswith("invalid configuration: WEBHOOK_KEY_SECRETS: "), message
    assert problem in message
    assert "\n" not in message
    for shown in ("alpha", "beta", "secret!", KEY_SECRET.removeprefix("whsec_")[:12]):
        assert shown not in message


def test_scheduling_defaults() -> None:
    settings = Settings(_env_file=None)
    assert settings.single_flight is True
    assert settings.priority_lanes is False
    assert (settings.priority_starvation_guard, settings.fair_share) == (10, True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variable", "value"),
    [("MAX_HEADER_BYTES", "10"), ("HEADER_TIMEOUT", "0"), ("TENANT_SECRET", "short")],
)
def test_a_bad_server_limit_stops_the_api_with_one_line_naming_it(
    variable: str, value: str
) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.api"],
        env={variable: value, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"fastapi-redis-mini: invalid configuration: {variable}: ")


def test_quotas_are_on_by_default_and_bound_all_clients_without_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in QUOTAS_OFF:  # what the suite sets for every other test
        monkeypatch.delenv(variable)
    defaults = Settings()
    assert (defaults.submit_rate_per_key, defaults.submit_burst_per_key) == (20.0, 100)
    assert defaults.max_unfinished_per_key == 1000
    assert defaults.max_stored_bytes_per_key == 64 * 1024 * 1024
    assert defaults.max_waits_per_key == 50
    assert defaults.quotas
    assert not defaults.api_keys


@pytest.mark.slow
def test_an_unknown_handler_stops_the_worker_with_its_name() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.worker"],
        env={"TASK_HANDLER": "no-such-model", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode != 0
    assert "TASK_HANDLER" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("admin_key", "api_keys"),
    [("", ""), ("short-key", ""), ("same-as-a-tenant-key", "same-as-a-tenant-key,other")],
)
def test_the_console_needs_its_own_admin_key_of_16_characters(
    admin_key: str, api_keys: str
) -> None:
    settings = Settings(console_enabled=True, admin_api_key=admin_key or None, api_keys=api_keys)
    with pytest.raises(SettingsError, match="ADMIN_API_KEY must"):
        settings.check_api()
    Settings(admin_api_key=admin_key or None, api_keys=api_keys).check_api()  # console off
    Settings(console_enabled=True, admin_api_key="x" * 16, api_keys=api_keys).check_api()


@pytest.mark.slow
def test_the_api_stops_with_one_line_naming_admin_api_key() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.api"],
        env={"CONSOLE_ENABLED": "true", "ADMIN_API_KEY": "too-short", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert "ADMIN_API_KEY must be set to at least 16 characters" in lines[0]
    assert "too-short" not in completed.stderr
