"""Limits on what the task routes accept, checked before anything reaches Redis.

The models here are what the routes parse their query and headers with, and what their
OpenAPI entries are built from, so the limits are written once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, Field, ValidationError

from ..core.handlers import MAX_TASK_DURATION
from ..core.models import TaskCreate
from ..core.settings import Settings
from ..core.webhooks import AllowedHosts, WebhookRefused, check_url
from .deps import validated
from .errors import InvalidFieldError

MAX_WAIT = 30.0


class SubmitHeaders(BaseModel):
    """The header a submit reads besides the API key."""

    idempotency_key: str | None = Field(
        default=None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",  # visible ASCII, no spaces
        description="Repeating a submit with the same key answers with the first task.",
    )


class ReadQuery(BaseModel):
    """The query of GET /tasks/{task_id}."""

    wait: float | None = Field(
        default=None,
        gt=0,
        le=MAX_WAIT,
        allow_inf_nan=False,
        description="Seconds to wait for the task to finish (long-poll).",
    )


def _depth(value: Any) -> int:
    """Nesting depth; raises ValueError on a number JSON cannot carry (NaN, Infinity)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a JSON number")
    return 0


class ParamsCheck:
    """A handler's Params model, made ready once at start to check every submit's params.

    Its validators find MAX_TASK_DURATION in the validation context (core/handlers.py). A
    submit without params is the common case: when the model accepts none, checked here once,
    such a submit needs no check at all, since a check depends only on the params and the
    context.
    """

    def __init__(self, model: type[BaseModel], max_task_duration: float) -> None:
        self.model = model
        self.context = {MAX_TASK_DURATION: max_task_duration}
        try:
            model.model_validate({}, context=self.context)
        except ValidationError:
            self.accepts_none = False
        else:
            self.accepts_none = True

    def __call__(self, params: dict[str, Any]) -> None:
        """Raise a 422 naming the first parameter the model refuses."""
        if params or not self.accepts_none:
            validated(self.model, params, "body", "params", context=self.context)


def check_task(
    task: TaskCreate,
    settings: Settings,
    check_params: Callable[[dict[str, Any]], None] | None,
    signing_key: bytes | None,
) -> None:
    """Raise a 422 naming the first field that breaks a limit.

    The size and depth limits hold for any handler; what the params mean is the handler's,
    checked with the Params model it declares (core/handlers.py), if it declares one. A
    webhook needs a `signing_key`: the one the submitting API key's deliveries get.
    """
    if len(task.prompt) > settings.max_prompt_chars:
        raise InvalidFieldError("prompt", f"longer than {settings.max_prompt_chars} characters")
    params = task.params
    try:
        depth = _depth(params)
        # What cannot be stored as JSON (integers beyond 64 bits, lone surrogates) is refused
        # here rather than failing later in the store.
        encoded = orjson.dumps(params)
    except (ValueError, orjson.JSONEncodeError) as error:
        raise InvalidFieldError("params", f"cannot be stored as JSON ({error})") from None
    if depth > settings.max_params_depth:
        raise InvalidFieldError("params", f"nested deeper than {settings.max_params_depth}")
    if len(encoded) > settings.max_params_bytes:
        raise InvalidFieldError("params", f"larger than {settings.max_params_bytes} bytes")
    if check_params is not None:
        check_params(params)
    if task.webhook is not None:
        _check_webhook(task.webhook, settings, signing_key)
    elif task.webhook_events is not None:
        raise InvalidFieldError("webhook_events", "given without a webhook")


def _check_webhook(url: str, settings: Settings, signing_key: bytes | None) -> None:
    if signing_key is None:
        raise InvalidFieldError(
            "webhook",
            "this service has no WEBHOOK_SECRET, nor a WEBHOOK_KEY_SECRETS entry for this API "
            "key, to sign deliveries with",
        )
    try:
        check_url(url, AllowedHosts(settings.webhook_allowed_hosts))
    except WebhookRefused as refused:
        raise InvalidFieldError("webhook", str(refused)) from None


def due_at(task: TaskCreate, settings: Settings) -> float:
    """When a task may start (Unix seconds), 0 for now; raise a 422 naming a bad schedule.

    A task waits at most RESULT_EXPIRY, the longest anything of it is kept.
    """
    limit = settings.result_expiry
    if task.deadline_seconds is not None and task.deadline_seconds > limit:
        raise InvalidFieldError("deadline_seconds", f"more than RESULT_EXPIRY ({limit} s)")
    if task.run_at is not None and task.delay_seconds is not None:
        raise InvalidFieldError("run_at", "give delay_seconds or run_at, not both")
    now = time.time()
    if task.delay_seconds is not None:
        if task.delay_seconds > limit:
            raise InvalidFieldError("delay_seconds", f"more than RESULT_EXPIRY ({limit} s)")
        return now + task.delay_seconds if task.delay_seconds else 0.0
    if task.run_at is None:
        return 0.0
    if task.run_at.tzinfo is None:
        raise InvalidFieldError("run_at", "needs a time zone, e.g. 2030-01-01T10:00:00Z")
    at = task.run_at.timestamp()
    if at < now:
        raise InvalidFieldError("run_at", "is in the past")
    if at - now > limit:
        raise InvalidFieldError("run_at", f"more than RESULT_EXPIRY ({limit} s) ahead")
    return at
