"""The one place the environment is read and checked."""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .webhooks import secret_key

PositiveSeconds = Annotated[float, Field(gt=0)]
# The admin key opens every tenant's tasks: 16 random characters of [A-Za-z0-9] are 95 bits,
# out of reach of guessing over the network.
MIN_ADMIN_KEY_CHARS = 16


def _default_web_concurrency() -> int:
    return max(2, min(2 * (os.cpu_count() or 1) + 1, 4))


class Settings(BaseSettings):
    """Every knob of the api and the worker; each field is read from the variable of its name."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # Redis and the data model
    redis_url: str = "redis://localhost:6379/0"
    redis_password: SecretStr | None = None
    redis_max_connections: int = Field(default=64, ge=2, le=10000)
    # Longer than the worker's 1 s blocking read; short enough that a frozen Redis becomes a
    # prompt 503 rather than a hung request.
    redis_socket_timeout: float = Field(default=2.0, ge=1.5, le=60)
    key_prefix: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:{}-]*$")
    queue_key: str = Field(default="task_stream", min_length=1, max_length=128)
    consumer_group: str = Field(default="workers", min_length=1, max_length=128)
    cache_ttl: int = Field(default=600, gt=0)
    result_expiry: int = Field(default=86400, gt=0)
    idempotency_ttl: int = Field(default=86400, gt=0)
    # When a 202 (and a worker's outcome) is acknowledged: "none" once Redis has it in memory,
    # "fsync" once it is on Redis's disk (WAITAOF), "replica" once a replica has it (WAIT).
    durable_acks: Literal["none", "fsync", "replica"] = "none"
    durable_ack_timeout: PositiveSeconds = 1.0
    # Redis Cluster: "true" uses the cluster client, "false" a single server's, and "auto"
    # asks the server at start (INFO cluster's cluster_enabled); an unreachable server
    # counts as a single one, so set it for a cluster whose start may find Redis down.
    redis_cluster: Literal["auto", "true", "false"] = "auto"
    # Partitions of the queue, each a stream with its tasks, cache entries and Idempotency-Keys
    # under its own hash tag. Unset: 1 on a single server, 16 on a cluster (see redis/keys.py).
    queue_partitions: int | None = Field(default=None, ge=1, le=256)

    # The worker
    max_concurrency: int = Field(default=5, ge=1, le=10000)
    read_batch: int = Field(default=100, ge=1, le=10000)
    task_handler: str = Field(default="simulate", min_length=1)
    task_timeout: PositiveSeconds = 30.0
    max_task_duration: PositiveSeconds = 25.0
    claim_idle: PositiveSeconds = 30.0
    max_deliveries: int = Field(default=5, ge=1)
    dead_letter_maxlen: int = Field(default=10000, ge=1)
    max_retries: int = Field(default=3, ge=0)
    retry_backoff: PositiveSeconds = 0.5
    retry_backoff_max: PositiveSeconds = 30.0
    shutdown_grace: PositiveSeconds = 30.0
    # Threads that run a synchronous (`def`) handler's calls (processes with
    # HANDLER_POOL=process, for pure-Python code that holds the GIL); unset: MAX_CONCURRENCY.
    handler_threads: int | None = Field(default=None, ge=1, le=1024)
    handler_pool: Literal["thread", "process"] = "thread"
    # A handler that holds the worker's event loop longer than this is logged and counted.
    loop_block_limit: PositiveSeconds = 1.0
    # Past TASK_TIMEOUT plus this, a loop still blocked or a handler call still running
    # fails /healthz: only a restart frees them.
    liveness_grace: PositiveSeconds = 30.0
    metrics_port: int = Field(default=9100, ge=0, le=65535)

    # Ids of the newest tasks each partition keeps, in all and per final status, for the
    # console; about 1.1 x this many ids per list at most (0: keep none).
    recent_tasks: int = Field(default=1000, ge=0, le=100_000)

    # The api
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    web_concurrency: int = Field(default_factory=_default_web_concurrency, ge=1, le=256)
    max_backlog: int = Field(default=10000, ge=0)
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    max_body_bytes: int = Field(default=65536, ge=256)
    max_prompt_chars: int = Field(default=8192, ge=1)
    max_params_bytes: int = Field(default=4096, ge=2)
    max_params_depth: int = Field(default=5, ge=1)
    # The operator's console at /console; it needs ADMIN_API_KEY.
    console_enabled: bool = False
    admin_api_key: SecretStr | None = None
    # Swagger UI at /docs and ReDoc at /redoc; /openapi.json stays either way.
    docs_enabled: bool = True
    # Seconds the api answers requests in flight after SIGTERM; the longest is a 30 s long-poll.
    drain_timeout: PositiveSeconds = 35.0
    # Quotas per API key (0: none; without API_KEYS they bound all clients together): a token
    # bucket of SUBMIT_BURST_PER_KEY submits refilled at SUBMIT_RATE_PER_KEY a second, a cap on
    # the tasks a key has that are not final yet, and one on the bytes its stored tasks hold
    # until they expire. One key's worst case in Redis is about MAX_STORED_BYTES_PER_KEY
    # (docs/security.md has the formula).
    submit_rate_per_key: float = Field(default=20.0, ge=0, le=1_000_000, allow_inf_nan=False)
    submit_burst_per_key: int = Field(default=100, ge=1, le=1_000_000)
    max_unfinished_per_key: int = Field(default=1000, ge=0)
    max_stored_bytes_per_key: int = Field(default=64 * 1024 * 1024, ge=0)
    # Long-polls (GET ?wait=) a key may hold open at once in one api process (0: no cap).
    max_waits_per_key: int = Field(default=50, ge=0, le=100_000)
    # The HTTP server (api/_server.py), per worker process: a request whose header section is
    # over MAX_HEADER_BYTES or MAX_HEADERS lines is answered 431; one whose headers take longer
    # than HEADER_TIMEOUT, or whose body takes longer than BODY_TIMEOUT, is answered 408 and
    # closed; connections past MAX_CONNECTIONS are closed at once.
    max_header_bytes: int = Field(default=16384, ge=1024, le=1_048_576)
    max_headers: int = Field(default=100, ge=8, le=10_000)
    header_timeout: PositiveSeconds = Field(default=10.0, le=300)
    body_timeout: PositiveSeconds = Field(default=15.0, le=300)
    max_connections: int = Field(default=1000, ge=1, le=100_000)
    # The api's /metrics, served apart from the public port (0: not served at all).
    api_metrics_port: int = Field(default=9101, ge=0, le=65535)
    # Tenant ids are an HMAC-SHA256 of the API key under this secret; unset, a plain SHA-256
    # (the ids of earlier releases), which a copy of Redis lets an attacker test guesses
    # against offline.
    tenant_secret: SecretStr | None = None

    # Task events: reports a task's stream keeps (the oldest are dropped first), seconds
    # between keep-alive comments on an idle event stream, and event streams one API key may
    # hold open at once on one api process (0: no cap; without API_KEYS, all clients together).
    events_maxlen: int = Field(default=1000, ge=1, le=1_000_000)
    events_heartbeat: PositiveSeconds = 15.0
    events_max_streams_per_key: int = Field(default=100, ge=0)

    # Webhooks: the signing secret (whsec_<base64>) and, for some API keys, one of their own
    # (API_KEY=whsec_<base64>, comma-separated; a submit with a webhook is refused when its
    # key has neither), deliveries in flight per worker, attempts before a delivery is
    # dead-lettered with the backoff between them, seconds per attempt, and the hosts or
    # networks (CIDRs) that may be reached though not public.
    webhook_secret: SecretStr | None = None
    webhook_key_secrets: Annotated[tuple[tuple[SecretStr, SecretStr], ...], NoDecode] = ()
    webhook_concurrency: int = Field(default=10, ge=1, le=1000)
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    webhook_backoff: PositiveSeconds = 1.0
    webhook_backoff_max: PositiveSeconds = 60.0
    webhook_timeout: PositiveSeconds = 10.0
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()

    # Scheduling (docs/scheduling.md)
    # An identical request of one API key, sent while a task for it is PENDING or RUNNING,
    # is answered with that task instead of making a second one.
    single_flight: bool = True
    # Tasks wait in per-priority lanes (high, normal, low) and a worker takes them from there;
    # off, every task is appended to the stream at once, in submit order.
    priority_lanes: bool = False
    # With lanes: of every PRIORITY_STARVATION_GUARD tasks a worker takes, one comes from a
    # lower lane when one has work, so low still progresses under a steady high load.
    priority_starvation_guard: int = Field(default=10, ge=2, le=1_000_000)
    # The API keys (some of API_KEYS) that may submit to the high lane; unset: every key.
    priority_high_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # With lanes: each API key's tasks take turns with every other key's within a lane, so
    # one key's backlog does not delay another's task; off, a lane is first come first served.
    fair_share: bool = True

    # Telemetry
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # prometheus_client's own variable: where processes of a multi-process api share counts.
    prometheus_multiproc_dir: str | None = None
    # OpenTelemetry's standard variables; tracing is off unless one of them asks for it.
    otel_traces_exporter: str | None = None
    otel_service_name: str | None = None
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_traces_endpoint: str | None = None
    # Read by the SDK itself; declared so the chart's ConfigMap holds only known settings.
    otel_traces_sampler: str | None = None
    otel_traces_sampler_arg: str | None = None
    otel_resource_attributes: str | None = None

    @property
    def tracing_exporter(self) -> str | None:
        """'otlp', 'console' or None, from the OTEL_* variables."""
        choice = (self.otel_traces_exporter or "").strip().lower()
        if choice in ("otlp", "console"):
            return choice
        if choice == "none":
            return None
        if self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint:
            return "otlp"
        return None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host")
        try:
            parts.port  # noqa: B018 - urlsplit checks the port only when asked
        except ValueError as exc:
            raise ValueError(f"has a bad port ({exc})") from None
        if parts.scheme != "rediss" and "ssl_" in parts.query:
            raise ValueError("has ssl_* options but is not a rediss:// (TLS) URL")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("tenant_secret")
    @classmethod
    def _check_tenant_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_allowed_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(entry.strip() for entry in value.split(",") if entry.strip())
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret_key(value.get_secret_value())
        return value

    @field_validator("webhook_key_secrets", mode="before")
    @classmethod
    def _split_key_secrets(cls, value: object) -> object:
        # The messages name an entry by its position: its text holds an API key and a secret.
        if not isinstance(value, str):
            return value
        pairs = []
        for number, entry in enumerate((e.strip() for e in value.split(",") if e.strip()), 1):
            # A key may hold '=' (base64 keys end with it); the secret starts at =whsec_.
            key, marker, secret = entry.rpartition("=whsec_")
            if not marker or not key.strip():
                raise ValueError(f"entry {number} is not of the form API_KEY=whsec_<base64>")
            pairs.append((key.strip(), "whsec_" + secret.strip()))
        return tuple(pairs)

    @field_validator("webhook_key_secrets")
    @classmethod
    def _check_key_secrets(
        cls, value: tuple[tuple[SecretStr, SecretStr], ...]
    ) -> tuple[tuple[SecretStr, SecretStr], ...]:
        seen: set[str] = set()
        for number, (key, secret) in enumerate(value, 1):
            if key.get_secret_value() in seen:
                raise ValueError(f"entry {number} names an API key an earlier entry names")
            seen.add(key.get_secret_value())
            try:
                secret_key(secret.get_secret_value())
            except ValueError as error:
                raise ValueError(f"entry {number}'s secret {error}") from None
        return value

    @field_validator("priority_high_keys", mode="before")
    @classmethod
    def _split_high_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_relations(self) -> Settings:
        if self.max_task_duration > self.task_timeout:
            raise ValueError(
                "MAX_TASK_DURATION must not exceed TASK_TIMEOUT "
                f"({self.max_task_duration} > {self.task_timeout})"
            )
        if self.task_timeout * 2 > self.result_expiry:
            # A start renews a task's expiry only past half of RESULT_EXPIRY (start.lua), so a
            # run must end within the half a younger task has left.
            raise ValueError(
                "TASK_TIMEOUT must be at most half of RESULT_EXPIRY "
                f"({self.task_timeout:g} > {self.result_expiry} / 2)"
            )
        if self.retry_backoff > self.retry_backoff_max:
            raise ValueError("RETRY_BACKOFF must not exceed RETRY_BACKOFF_MAX")
        if self.durable_ack_timeout >= self.redis_socket_timeout:
            raise ValueError(
                "DURABLE_ACK_TIMEOUT must be below REDIS_SOCKET_TIMEOUT "
                f"({self.durable_ack_timeout:g} >= {self.redis_socket_timeout:g}): the wait "
                "is one Redis command"
            )
        if self.queue_partitions is not None and self.queue_partitions > 1 and self.quotas:
            raise ValueError(
                "QUEUE_PARTITIONS above 1 cannot be combined with the per-key quotas yet (a "
                "key's quota is counted in one partition): set SUBMIT_RATE_PER_KEY, "
                "MAX_UNFINISHED_PER_KEY and MAX_STORED_BYTES_PER_KEY to 0, or leave "
                "QUEUE_PARTITIONS unset"
            )
        if self.api_metrics_port and self.api_metrics_port in (self.port, self.metrics_port):
            raise ValueError(
                f"API_METRICS_PORT must differ from PORT and METRICS_PORT "
                f"({self.api_metrics_port}): /metrics is kept off the public port"
            )
        return self

    def check_api(self) -> None:
        """What only the api needs to hold (the worker shares the rest but not API_KEYS)."""
        if self.priority_high_keys:
            configured = {key.get_secret_value() for key in self.api_keys}
            if any(key.get_secret_value() not in configured for key in self.priority_high_keys):
                raise SettingsError(
                    "invalid configuration: PRIORITY_HIGH_KEYS must name keys of API_KEYS"
                )
        if self.webhook_key_secrets:
            configured = {key.get_secret_value() for key in self.api_keys}
            if any(key.get_secret_value() not in configured for key, _ in self.webhook_key_secrets):
                raise SettingsError(
                    "invalid configuration: WEBHOOK_KEY_SECRETS must name keys of API_KEYS"
                )
        if self.console_enabled:
            admin_key = self.admin_api_key.get_secret_value() if self.admin_api_key else ""
            if len(admin_key) < MIN_ADMIN_KEY_CHARS:
                raise SettingsError(
                    "invalid configuration: ADMIN_API_KEY must be set to at least "
                    f"{MIN_ADMIN_KEY_CHARS} characters when CONSOLE_ENABLED is true"
                )
            if any(key.get_secret_value() == admin_key for key in self.api_keys):
                raise SettingsError(
                    "invalid configuration: ADMIN_API_KEY must differ from every key of API_KEYS"
                )

    @property
    def handler_thread_count(self) -> int:
        """HANDLER_THREADS, or MAX_CONCURRENCY when unset: one thread per task that may run."""
        return self.handler_threads or self.max_concurrency

    @property
    def quotas(self) -> bool:
        """Whether submits are counted per key: a rate, or a cap on unfinished tasks or bytes."""
        return bool(
            self.submit_rate_per_key or self.max_unfinished_per_key or self.max_stored_bytes_per_key
        )


class SettingsError(SystemExit):
    """Raised at start when the environment holds a bad value; the message names the variable."""


def describe_error(error: ValidationError) -> str:
    """Turn pydantic's report into one line naming each bad variable."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"] if isinstance(part, str))
        name = field.upper() if field else "configuration"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{name}: {message}")
    return "invalid configuration: " + "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the environment once; a bad value raises SettingsError with a one-line message."""
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError(describe_error(error)) from None


def load_settings_or_exit(*, api: bool = False) -> Settings:
    """Entry-point helper: print the one-line error to stderr and exit 2 on bad configuration."""
    try:
        settings = get_settings()
        if api:
            settings.check_api()
        return settings
    except SettingsError as error:
        print(f"fastapi-redis-mini: {error}", file=sys.stderr)
        raise SystemExit(2) from None
