"""Task handlers: the pluggable part that does the actual work of a task."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from .embedding import EmbedModel


class RetryableError(Exception):
    """Raise from a handler when trying again later may succeed (a busy model, a flaky network)."""


class TaskFailedError(Exception):
    """Raise from a handler to fail a task with a message meant for the client."""


class TaskContext(Protocol):
    """What a handler may report while it runs, if it takes a `context` argument (a batched
    handler: `contexts`, one per item). Both calls return at once, from the event loop or a
    thread: reports are sent in the background, consecutive ones merged, and a report that
    cannot be stored is dropped, never failing the task."""

    def progress(self, fraction: float, message: str = "") -> None:
        """How far the task got, from 0 to 1, with an optional message for humans."""
        ...

    def emit(self, chunk: str) -> None:
        """A piece of partial output, such as the next tokens; the result is still returned."""
        ...


class TaskHandler(Protocol):
    """Runs one task. The return value is stored as the result and must be JSON-serialisable.

    An async handler runs on the worker's event loop, beside the other tasks; a synchronous
    one (`SyncTaskHandler`) runs in a thread of its own. Either may also have a `load()` and a
    `close()` method (see `worker/_handler.py`).
    """

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any: ...


class SyncTaskHandler(Protocol):
    """Runs one task in a thread of the worker's pool (HANDLER_THREADS): for blocking code."""

    def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any: ...


class BatchTaskHandler(Protocol):
    """Runs a batch of tasks in one call, sync or async: one result, or one exception
    instance that fails that task alone, per item and in order (see worker/_batch.py)."""

    max_batch_size: int

    def __call__(self, prompts: list[str], params: list[Mapping[str, Any]]) -> Any: ...


class ReportingTaskHandler(Protocol):
    """A handler, async or sync, that reports through its TaskContext as it runs."""

    def __call__(self, prompt: str, params: Mapping[str, Any], context: TaskContext) -> Any: ...


class ReportingBatchTaskHandler(Protocol):
    """A batched handler that reports per item, through `contexts` (one per item, in order)."""

    max_batch_size: int

    def __call__(
        self, prompts: list[str], params: list[Mapping[str, Any]], contexts: list[TaskContext]
    ) -> Any: ...


AnyTaskHandler = (
    TaskHandler
    | SyncTaskHandler
    | BatchTaskHandler
    | ReportingTaskHandler
    | ReportingBatchTaskHandler
)


# What a Params model's validators find in their ValidationInfo.context.
MAX_TASK_DURATION = "max_task_duration"


class SimulateParams(BaseModel):
    """The params the built-in handler reads. Other keys pass: they are part of the signature."""

    model_config = ConfigDict(extra="allow")

    duration: float = Field(
        default=0.0,
        ge=0,
        strict=True,
        allow_inf_nan=False,
        description="Seconds to take, at most MAX_TASK_DURATION.",
    )
    fail: StrictBool = Field(default=False, description="Fail the task.")
    retryable: StrictBool = Field(default=False, description="With fail: fail it retryably.")
    model: StrictStr = Field(default="sim-1", description="Echoed back in the result.")

    @field_validator("duration")
    @classmethod
    def _at_most_max_task_duration(cls, value: float, info: ValidationInfo) -> float:
        limit = (info.context or {}).get(MAX_TASK_DURATION)
        if limit is not None and value > limit:
            raise ValueError(f"must be at most MAX_TASK_DURATION ({limit:g} seconds)")
        return value


class SimulatedInference:
    """Stands in for a model: waits params.duration seconds, then answers deterministically.

    With a duration, it reports as a model would: the words of its output one by one, at
    even intervals over the duration, each with its progress.
    """

    Params = SimulateParams

    def __init__(self, max_duration: float) -> None:
        self.max_duration = max_duration

    async def __call__(
        self, prompt: str, params: Mapping[str, Any], context: TaskContext | None = None
    ) -> Any:
        options = SimulateParams.model_validate(params)
        duration = min(options.duration, self.max_duration)
        model = options.model
        digest = hashlib.sha256(f"{model}\0{prompt}".encode()).hexdigest()[:16]
        words = prompt.split()
        output = f"[{model}] {digest}: {' '.join(reversed(words[:32]))}"
        if duration > 0:
            if context is None:
                await asyncio.sleep(duration)
            else:
                await _stream(output.split(" "), duration, context)
        if options.fail:
            if options.retryable:
                raise RetryableError("simulated transient failure")
            raise TaskFailedError("simulated failure requested by params.fail")
        return {
            "model": model,
            "output": output,
            "prompt_tokens": len(words),
            "completion_tokens": min(len(words), 32) + 2,
        }


async def _stream(words: list[str], duration: float, context: TaskContext) -> None:
    """Emit `words` at even intervals over `duration`, each step with its progress."""
    interval = duration / len(words)
    for index, word in enumerate(words):
        await asyncio.sleep(interval)
        context.emit(word if index == 0 else f" {word}")
        context.progress((index + 1) / len(words), f"{index + 1} of {len(words)} words")


class SimulatedAccelerator:
    """Stands in for a model on an accelerator, which takes batches (see worker/_batch.py).

    Each call costs CALL_SECONDS however many items it carries, plus ITEM_SECONDS per item,
    plus the longest params.duration among them: batching pays off as it would on a GPU. Like
    one device, it runs one call at a time; calls made meanwhile queue for it. Each item
    answers as `simulate` would, and params.fail fails only its own item.
    """

    Params = SimulateParams
    CALL_SECONDS = 0.02
    ITEM_SECONDS = 0.0005
    max_batch_size = 32
    max_batch_wait_ms = 5.0

    def __init__(self, max_duration: float) -> None:
        self.one = SimulatedInference(0)
        self.max_duration = max_duration
        self.device = asyncio.Lock()

    async def __call__(self, prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        options = [SimulateParams.model_validate(p) for p in params]
        longest = min(max(o.duration for o in options), self.max_duration)
        async with self.device:
            await asyncio.sleep(self.CALL_SECONDS + self.ITEM_SECONDS * len(prompts) + longest)
        answers: list[Any] = []
        for prompt, item in zip(prompts, params, strict=True):
            try:
                answers.append(await self.one(prompt, {**item, "duration": 0.0}))
            except Exception as error:
                answers.append(error)
        return answers


HandlerFactory = Callable[[float], AnyTaskHandler]

HANDLERS: dict[str, HandlerFactory] = {
    "simulate": SimulatedInference,
    "simulate-batched": SimulatedAccelerator,
    "embed": EmbedModel,
}


def _factory(name: str) -> HandlerFactory:
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise LookupError(f"TASK_HANDLER: cannot load {name!r} ({error})") from None
        return cast(HandlerFactory, factory)
    try:
        return HANDLERS[name]
    except KeyError:
        known = ", ".join(sorted(HANDLERS))
        raise LookupError(f"TASK_HANDLER: unknown handler {name!r} (known: {known})") from None


def resolve_handler(name: str, max_duration: float) -> AnyTaskHandler:
    """A registered name, or "package.module:factory" for a handler that lives elsewhere."""
    return _factory(name)(max_duration)


def handler_params(name: str) -> type[BaseModel] | None:
    """The Params model the handler's factory declares, if any, without making the handler.

    The api validates every submit's params with it, passing MAX_TASK_DURATION in the
    validation context, so a bad parameter is a 422 naming it rather than a failed task.
    """
    params = getattr(_factory(name), "Params", None)
    if params is not None and not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise LookupError(f"TASK_HANDLER: {name!r} has a Params that is not a pydantic model")
    return params
