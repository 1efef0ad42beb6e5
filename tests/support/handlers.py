"""Task handlers for tests, loaded by workers as TASK_HANDLER=tests.support.handlers:NAME."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fastapi_redis_mini.core.handlers import RetryableError, SimulatedInference, TaskHandler


def hang(max_duration: float) -> TaskHandler:
    """Never finishes on its own: only a timeout, a cancel or a shutdown ends it."""

    async def handler(prompt: str, params: Mapping[str, Any]) -> Any:
        await asyncio.sleep(3600)

    return handler


def poison(max_duration: float) -> TaskHandler:
    """Kills its whole process on the prompt "poison"; otherwise simulates inference."""
    simulate = SimulatedInference(max_duration)

    async def handler(prompt: str, params: Mapping[str, Any]) -> Any:
        if prompt == "poison":
            os._exit(17)
        return await simulate(prompt, params)

    return handler


class FlakyThenFine:
    """Raises RetryableError for the first `failures` calls of each prompt, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        self.calls[prompt] = self.calls.get(prompt, 0) + 1
        if self.calls[prompt] <= self.failures:
            raise RetryableError(f"busy (call {self.calls[prompt]})")
        return {"calls": self.calls[prompt]}


async def not_json(prompt: str, params: Mapping[str, Any]) -> Any:
    return {"a set": {1, 2}}


class TranslateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: Literal["de", "fr"]


class Translator:
    """A handler with a Params model of its own, which the api checks every submit against."""

    Params = TranslateParams

    def __init__(self, max_duration: float) -> None:
        self.max_duration = max_duration

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        return {"translation": f"[{TranslateParams.model_validate(params).target}] {prompt}"}


class NotAModel:
    """A factory whose Params is not a pydantic model: the api refuses to start with it."""

    Params = dict

    def __init__(self, max_duration: float) -> None:
        self.max_duration = max_duration

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        return None
