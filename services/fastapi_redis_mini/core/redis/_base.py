"""What the parts of RedisTaskQueue share: the QueueBase under them, and `_translated`.

Owns QueueBase, which declares the attributes RedisTaskQueue.__init__ sets that more than one
part reads (beside SlotRouting's, which it extends), and the `_translated` decorator the
queue's methods wear, so that no caller needs to know redis-py's errors. Each part
(_submit.py, _worker.py, _webhook_store.py, _operators.py) is a base of RedisTaskQueue over
QueueBase and declares the attributes only it reads.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from ..queue import QueueState, QueueUnavailable
from ._errors import queue_error, torn_down
from ._routing import SlotRouting
from .keys import Keys

P = ParamSpec("P")
T = TypeVar("T")


class QueueBase(SlotRouting):
    """The state RedisTaskQueue's parts share (a base class, never made on its own)."""

    # Set by RedisTaskQueue.__init__.
    keys: Keys  # the only partition's, with QUEUE_PARTITIONS=1
    _publish: str
    _announces_work: bool


def _translated(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Raise the queue's own errors from a method, so no caller needs to know redis-py's."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            queue = args[0] if args else None
            if isinstance(queue, QueueBase) and queue.slots_unknown:
                await queue.learn_slots()
            return await method(*args, **kwargs)
        except (RedisError, RedisClusterException) as error:
            translated = queue_error(error)
            if translated is None:
                raise
            raise translated from error
        except (AttributeError, RuntimeError) as error:
            if not torn_down(error):
                raise
            detail = f"a connection closed during the call ({type(error).__name__}: {error})"
            raise QueueUnavailable(QueueState.UNREACHABLE, detail) from error

    return call
