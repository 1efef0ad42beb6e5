"""Task handlers for tests, loaded by workers as TASK_HANDLER=tests.support.handlers:NAME."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
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


def _record_run(params: Mapping[str, Any]) -> None:
    """Append this process's pid to the file params["runs"] names: one line per run."""
    if "runs" in params:
        with open(str(params["runs"]), "a") as runs:
            runs.write(f"{os.getpid()}\n")


def _first_run(params: Mapping[str, Any]) -> bool:
    """True for the first run of a task across every process: it creates params["marker"]."""
    try:
        os.close(os.open(str(params["marker"]), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


class BlockingModel:
    """A synchronous model: one blocking call of params["block"] seconds per task, as a
    forward pass holding a C extension would be. Runs in the worker's thread pool."""

    def __init__(self, max_duration: float) -> None:
        self.loaded = False

    def load(self) -> None:
        time.sleep(float(os.environ.get("TEST_LOAD_SECONDS", "0")))
        self.loaded = True

    def close(self) -> None:
        self.loaded = False

    def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        _record_run(params)
        time.sleep(float(params.get("block", 0)))
        if params.get("fail"):
            raise ValueError(f"bad input: {prompt}")
        return {
            "prompt": prompt,
            "loaded": self.loaded,
            "thread": threading.current_thread().name,
            "pid": os.getpid(),
        }


class DeafToTerm(BlockingModel):
    """A BlockingModel whose process ignores SIGTERM once loaded, as a process stuck in a C
    call that masks signals would: only SIGKILL ends it."""

    def load(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        super().load()


class LoopBlocker:
    """An async handler that makes one synchronous call: it holds the worker's event loop
    for params["block"] seconds, as a model called without a thread would."""

    def __init__(self, max_duration: float) -> None:
        pass

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        _record_run(params)
        time.sleep(float(params.get("block", 0)))  # noqa: ASYNC251 - the defect under test
        return {"prompt": prompt}


class HangsOnFirstRun:
    """An async handler whose first run (across processes) holds the loop for good; later
    runs answer at once. params["marker"] names the file that marks the first run."""

    def __init__(self, max_duration: float) -> None:
        pass

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        _record_run(params)
        if _first_run(params):
            time.sleep(3600)  # noqa: ASYNC251 - the defect under test; the test kills us
        return {"prompt": prompt}


class BatchModel:
    """A synchronous batched model: one blocking call per batch of up to 8 prompts.

    The call blocks for the largest params["block"] of its items. A prompt starting with "bad"
    is an input the model rejects (a ValueError for that item alone), "busy" a transient one
    (RetryableError). Remembers each batch's prompts.
    """

    max_batch_size = 8
    max_batch_wait_ms = 50

    def __init__(self, max_duration: float) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        self.batches.append(list(prompts))
        time.sleep(max(float(p.get("block", 0)) for p in params))
        answers: list[Any] = []
        for prompt in prompts:
            if prompt.startswith("bad"):
                answers.append(ValueError(f"cannot read {prompt!r}"))
            elif prompt.startswith("busy"):
                answers.append(RetryableError("the model is busy"))
            else:
                answers.append({"upper": prompt.upper(), "batch": len(prompts)})
        return answers


class OverlapModel:
    """A synchronous batched model that logs when each call begins and ends.

    Appends "<begin>\t<end>\t<items>" (time.time()) to the file params["log"] names, after
    blocking for params["block"] seconds: whether calls overlapped, seen from another process.
    Takes two batches in flight; OneAtATimeModel, one.
    """

    max_batch_size = 4
    max_batch_wait_ms = 20
    max_batches_in_flight = 2

    def __init__(self, max_duration: float) -> None:
        pass

    def __call__(self, prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        began = time.time()
        time.sleep(float(params[0].get("block", 0)))
        with open(str(params[0]["log"]), "a") as log:
            log.write(f"{began!r}\t{time.time()!r}\t{len(prompts)}\n")
        return [{"prompt": prompt} for prompt in prompts]


class OneAtATimeModel(OverlapModel):
    max_batches_in_flight = 1


class Recorder:
    """Appends "<prompt>\\t<time.time()>" to the file params["log"] names as each run starts,
    then waits params["duration"] seconds: the order and times the handler saw, across
    processes."""

    def __init__(self, max_duration: float) -> None:
        pass

    async def __call__(self, prompt: str, params: Mapping[str, Any]) -> Any:
        # One short append, before the run: the start time is what the tests read.
        with open(str(params["log"]), "a") as log:  # noqa: ASYNC230
            log.write(f"{prompt}\t{time.time()!r}\n")
        await asyncio.sleep(float(params.get("duration", 0)))
        return {"prompt": prompt}
