"""Limits on what the task routes accept, checked before anything reaches Redis.

The models here are what the routes parse their query and headers with, and what their
OpenAPI entries are built from, so the limits are written once.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from pydantic import BaseModel, Field

from ..core.models import TaskCreate
from ..core.settings import Settings
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


def check_task(task: TaskCreate, settings: Settings) -> None:
    """Raise InvalidFieldError naming the first field that breaks a limit."""
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
    duration = params.get("duration", 0)
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise InvalidFieldError("params.duration", "must be a number of seconds")
    if not 0 <= duration <= settings.max_task_duration:
        raise InvalidFieldError(
            "params.duration", f"must be between 0 and {settings.max_task_duration:g} seconds"
        )
    for flag in ("fail", "retryable"):
        if flag in params and not isinstance(params[flag], bool):
            raise InvalidFieldError(f"params.{flag}", "must be true or false")
    if "model" in params and not isinstance(params["model"], str):
        raise InvalidFieldError("params.model", "must be a string")
