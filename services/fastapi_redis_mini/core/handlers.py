"""Task handlers: the pluggable part that does the actual work of a task."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast


class RetryableError(Exception):
    """Raise from a handler when trying again later may succeed (a busy model, a flaky network)."""


class TaskFailedError(Exception):
    """Raise from a handler to fail a task with a message meant for the client."""


class TaskHandler(Protocol):
    """Runs one task. The return value is stored as the result and must be JSON-serialisable."""

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any: ...


class SimulatedInference:
    """Stands in for a model: waits params.duration seconds, then answers deterministically.

    params: duration (seconds, float, capped by MAX_TASK_DURATION), fail (bool: raise),
    retryable (bool: with fail, raise RetryableError), model (str: echoed back).
    """

    def __init__(self, max_duration: float) -> None:
        self.max_duration = max_duration

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        duration = min(float(params.get("duration", 0.0) or 0.0), self.max_duration)
        if duration > 0:
            await asyncio.sleep(duration)
        if params.get("fail"):
            if params.get("retryable"):
                raise RetryableError("simulated transient failure")
            raise TaskFailedError("simulated failure requested by params.fail")
        model = str(params.get("model", "sim-1"))
        digest = hashlib.sha256(f"{model}\0{prompt}".encode()).hexdigest()[:16]
        words = prompt.split()
        return {
            "model": model,
            "output": f"[{model}] {digest}: {' '.join(reversed(words[:32]))}",
            "prompt_tokens": len(words),
            "completion_tokens": min(len(words), 32) + 2,
        }


HandlerFactory = Callable[[float], TaskHandler]

HANDLERS: dict[str, HandlerFactory] = {"simulate": SimulatedInference}


def resolve_handler(name: str, max_duration: float) -> TaskHandler:
    """A registered name, or "package.module:factory" for a handler that lives elsewhere."""
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise LookupError(f"TASK_HANDLER: cannot load {name!r} ({error})") from None
        return cast(HandlerFactory, factory)(max_duration)
    try:
        factory = HANDLERS[name]
    except KeyError:
        known = ", ".join(sorted(HANDLERS))
        raise LookupError(f"TASK_HANDLER: unknown handler {name!r} (known: {known})") from None
    return factory(max_duration)
