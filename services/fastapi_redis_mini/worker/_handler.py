"""How the worker calls its handler: on the loop or in a thread, and its load and close steps.

An async handler (`async def __call__`) is awaited on the worker's event loop, so a no-op task
costs no thread hop. A synchronous one (`def __call__`) runs in a pool of HANDLER_THREADS
threads, so blocking code (a model's forward pass, a C extension that keeps the GIL between
calls) leaves the loop free to read, write outcomes and answer probes.

With HANDLER_POOL=process a synchronous handler runs in HANDLER_THREADS processes instead,
for pure-Python code that holds the GIL: each process makes its own handler from TASK_HANDLER
and runs its `load()` once at start; the worker's own handler object is never loaded nor
called. Arguments and results cross by pickle, and `close()` is not called in them: they are
terminated at shutdown (SIGTERM, then SIGKILL for one still there 5 s on).

A thread cannot be stopped from outside. When TASK_TIMEOUT, a cancel or the shutdown grace
ends a synchronous call, the worker writes the task's outcome at once and forgets the call;
its thread runs on until the handler returns, its result is thrown away, and meanwhile the
pool has one thread fewer. A call still running TASK_TIMEOUT + LIVENESS_GRACE after it began
fails /healthz, so that Kubernetes restarts the worker and frees the thread.

A handler that declares a `context` parameter (a batched one: `contexts`) gets a TaskContext
per task to report progress and partial output through (see _report.py). A process of
HANDLER_POOL=process cannot reach the worker's loop, so such a handler is refused there.

Optional lifecycle methods, sync or async, each called once per worker process:
`load()` before the worker reads its first task (/readyz answers "loading" until it
returns), and `close()` once the worker has drained, at shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, cast

from ..core.handlers import AnyTaskHandler, TaskContext, resolve_handler
from ..core.settings import Settings
from ._batch import BatchCall, Batcher, BatchOptions, batch_options
from ._report import NO_REPORTS

log = logging.getLogger(__name__)


def takes_parameter(handler: object, name: str) -> bool:
    """Whether the handler's call declares a parameter of this name."""
    try:
        return name in inspect.signature(handler).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def is_async(handler: object) -> bool:
    """Whether calling the handler returns a coroutine: an async function or `async __call__`."""
    if inspect.iscoroutinefunction(handler):
        return True
    return inspect.iscoroutinefunction(type(handler).__call__)


class HandlerRunner:
    """The handler of one worker process, with the thread pool a synchronous one runs in."""

    def __init__(self, handler: AnyTaskHandler, settings: Settings) -> None:
        self.handler = handler
        self.name = settings.task_handler
        self.is_async = is_async(handler)
        self.in_processes = settings.handler_pool == "process" and not self.is_async
        self._executor: Executor | None = None
        self._target: Callable[..., Any] = handler
        # Since when (monotonic) each synchronous call sent to the pool has been there, until
        # it returns, including those the worker gave up on. Written by the pool's threads,
        # read by the watchdog's: single dict operations, atomic under the GIL.
        self._running: dict[int, float] = {}
        self._call_ids = itertools.count()
        if self.in_processes:
            self._executor = ProcessPoolExecutor(
                settings.handler_thread_count,
                # Not fork: this process has threads (the sidecar, the pool's manager).
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_process,
                initargs=(settings.task_handler, settings.max_task_duration),
            )
            self._target = _call_in_process
        elif not self.is_async:
            self._executor = ThreadPoolExecutor(
                settings.handler_thread_count, thread_name_prefix="handler"
            )
        self.batching = batch_options(handler, self.name)
        self.takes_context = takes_parameter(
            handler, "context" if self.batching is None else "contexts"
        )
        if self.takes_context and self.in_processes:
            raise ValueError(
                f"TASK_HANDLER: {self.name!r} takes a context, which HANDLER_POOL=process "
                "cannot pass; use HANDLER_POOL=thread"
            )
        # The one callable the worker awaits per task: the handler itself when it is async.
        target = cast(
            Callable[..., Awaitable[Any]], handler if self.is_async else self._call_in_thread
        )
        self.call: Callable[..., Awaitable[Any]] = (
            target if self.takes_context else _without_context(target)
        )
        # The most tasks one call of the handler takes: 1 unless it takes batches.
        self.batch_size = 1
        if self.batching is not None:
            batcher = self._batcher(self.batching, settings)
            self.batch_size = batcher.size
            self.call = batcher

    def _batcher(self, options: BatchOptions, settings: Settings) -> Batcher:
        in_flight = options.max_in_flight
        if self._executor is not None and in_flight > settings.handler_thread_count:
            in_flight = settings.handler_thread_count  # a batch in flight holds a thread
        size = options.max_size
        # A worker holds at most MAX_CONCURRENCY tasks, so the batches in flight share them.
        # Room for the next batch to fill is not kept here: whether smaller batches that
        # follow each other at once beat full ones with a pause between them depends on the
        # model's fixed cost per call, which the handler knows (see max_batch_size).
        limit = max(1, settings.max_concurrency // in_flight)
        if size > limit:
            log.info(
                "handler %s: batches of at most %d (MAX_CONCURRENCY / max_batches_in_flight), "
                "not %d (max_batch_size)", self.name, limit, size,
            )  # fmt: skip
            size = limit
        call = cast(BatchCall, self.handler if self.is_async else self._call_in_thread)
        return Batcher(
            call, size, options.max_wait_ms, in_flight=in_flight, with_contexts=self.takes_context
        )

    def _call_in_thread(self, *args: Any) -> Awaitable[Any]:
        assert self._executor is not None
        call = next(self._call_ids)
        self._running[call] = time.monotonic()
        sent = self._executor.submit(self._target, *args)

        def returned(_: Future[Any]) -> None:
            self._running.pop(call, None)

        # Runs when the call really ends, not when the worker stops waiting for it.
        sent.add_done_callback(returned)
        return asyncio.wrap_future(sent)

    def oldest_call_started(self) -> float | None:
        """When the longest-running synchronous call began (monotonic), if one runs."""
        return min(self._running.copy().values(), default=None)

    @property
    def threads_busy(self) -> int:
        """Synchronous calls whose thread still runs, abandoned ones included."""
        return len(self._running)

    async def load(self) -> None:
        """Run the handler's `load()`, if it has one; a synchronous one runs in a thread.

        With processes: start them, each loading its own handler, and wait for one to answer.
        """
        if self.in_processes:
            started = time.monotonic()
            await self._call_in_thread(None, None)
            log.info(
                "handler %s: processes started in %.2fs", self.name, time.monotonic() - started
            )
            return
        await self._lifecycle("load")

    async def close(self, within: float) -> None:
        """Run the handler's `close()` for at most `within` seconds, then let the pool go."""
        try:
            if not self.in_processes:
                await asyncio.wait_for(self._lifecycle("close"), within)
        except TimeoutError:
            log.warning("handler %s: close() still running after %gs", self.name, within)
        except Exception:
            log.exception("handler %s: close() failed", self.name)
        if self._executor is not None:
            # Never wait for a thread that may never return: the process exits past it.
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.in_processes:
            await asyncio.to_thread(_terminate_children, within)

    async def _lifecycle(self, step: str) -> None:
        method = getattr(self.handler, step, None)
        if method is None:
            return
        if not callable(method):
            raise TypeError(f"TASK_HANDLER: {self.name!r} has a {step} that is not callable")
        started = time.monotonic()
        if inspect.iscoroutinefunction(method):
            await method()
        else:
            await asyncio.to_thread(functools.partial(method))
        log.info("handler %s: %s() took %.2fs", self.name, step, time.monotonic() - started)


def _without_context(
    call: Callable[..., Awaitable[Any]],
) -> Callable[[str, Mapping[str, Any], TaskContext], Awaitable[Any]]:
    def without(
        prompt: str, params: Mapping[str, Any], _: TaskContext = NO_REPORTS
    ) -> Awaitable[Any]:
        return call(prompt, params)

    return without


def _terminate_children(within: float) -> None:
    """End the pool's processes, a call still running in them included: SIGTERM, and SIGKILL
    for any still there `within` seconds on.

    The pool's own thread joins its processes too as it shuts down, and whichever of two
    joins reaps a process first, the other can return before the process's end is recorded.
    So this asks `active_children()`, which looks again, until none is left.
    """
    deadline = time.monotonic() + within
    while children := multiprocessing.active_children():
        if time.monotonic() >= deadline:
            for child in children:
                log.warning("handler pool process %s outlived SIGTERM; killed", child.pid)
                child.kill()
                child.join(1.0)
            return
        for child in children:
            child.terminate()
        time.sleep(0.02)


# -- in the processes of HANDLER_POOL=process

_process_handler: Any = None


def _start_process(task_handler: str, max_task_duration: float) -> None:
    global _process_handler  # one handler per pool process, made once
    handler = resolve_handler(task_handler, max_task_duration)
    load = getattr(handler, "load", None)
    if load is not None:
        if inspect.iscoroutinefunction(load):
            asyncio.run(load())
        else:
            load()
    _process_handler = handler


def _call_in_process(*args: Any) -> Any:
    if args == (None, None):
        return None  # the start-up call: the process is up and its handler loaded
    return _process_handler(*args)
