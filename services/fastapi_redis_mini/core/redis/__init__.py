"""Redis, behind one boundary: the TaskQueue implementation, its key names and Lua scripts.

No other module imports `redis` (ruff's banned-api enforces it): the api and the worker see
the TaskQueue protocol of core/queue.py and its error types, never a Redis command or error.
"""

from ._connect import Client, connect
from ._durability import exit_unless_durable_acks
from ._errors import queue_error
from .keys import Keys
from .queue import RedisTaskQueue, new_task_id, record_layout_at_start

__all__ = [
    "Client",
    "Keys",
    "RedisTaskQueue",
    "connect",
    "exit_unless_durable_acks",
    "new_task_id",
    "queue_error",
    "record_layout_at_start",
]
