"""Error translation: what a redis-py error means for the queue.

Owns the map from the server's error prefixes to QueueState (queue_error) and the test for a
connection closed under a call (torn_down). RedisTaskQueue's `_translated` decorator (_base.py)
raises what these say, so no caller needs to know redis-py's errors.
"""

from __future__ import annotations

from redis.asyncio import connection as redis_connection
from redis.exceptions import (
    ClusterError,
    CrossSlotTransactionError,
    InvalidPipelineStack,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..queue import QueueBusy, QueueState, QueueUnavailable

# The error prefixes of the server states that pass on their own. redis-py gives some their own
# class (OutOfMemoryError, ReadOnlyError, BusyLoadingError, ...) and leaves the rest a plain
# ResponseError, so the prefix, not the class, decides.
_SERVER_STATES = {
    "OOM": QueueState.OUT_OF_MEMORY,
    "READONLY": QueueState.READ_ONLY,
    "MISCONF": QueueState.CANNOT_PERSIST,
    "LOADING": QueueState.LOADING,
    "BUSY": QueueState.BUSY,
    "MASTERDOWN": QueueState.MASTER_DOWN,
    "TRYAGAIN": QueueState.TRY_AGAIN,
    "CLUSTERDOWN": QueueState.CLUSTER_DOWN,
    "UNBLOCKED": QueueState.UNBLOCKED,
    "NOREPLICAS": QueueState.NO_REPLICAS,
}


def queue_error(error: RedisError | RedisClusterException) -> QueueUnavailable | None:
    """The queue's error for a Redis error, or None when the error is a defect of ours."""
    if isinstance(error, RedisClusterException):
        # The cluster client's own verdicts while the topology changes (a slot no node serves
        # yet, no node reachable, nodes that disagree on the slots), not the server's. Only a
        # pipeline or transaction the client refuses to send is ours to fix.
        if isinstance(error, (CrossSlotTransactionError, InvalidPipelineStack)):
            return None
        return QueueUnavailable(QueueState.CLUSTER_DOWN, str(error) or type(error).__name__)
    # redis-py strips the prefix from the message of the errors it maps and keeps it in
    # status_code; the others keep it as their first word.
    prefix = error.status_code or str(error).partition(" ")[0]
    state = _SERVER_STATES.get(prefix)
    if state is not None:
        return QueueBusy(state, str(error))
    if isinstance(error, (RedisConnectionError, RedisTimeoutError)):
        return QueueUnavailable(QueueState.UNREACHABLE, str(error) or type(error).__name__)
    if type(error) is ClusterError:
        # Raised by the cluster client after too many redirections in a row ("TTL
        # exhausted"): slots were moving or failing over for the whole retry.
        return QueueUnavailable(QueueState.CLUSTER_DOWN, str(error))
    return None


def torn_down(error: BaseException) -> bool:
    """Whether `error` is redis-py meeting a connection that was closed under it.

    The cluster client closes a node's connections when the node fails or the cluster is
    down, including connections another call is using. That call then fails inside
    redis-py's connection code, as an AttributeError (its writer is gone) or a RuntimeError
    from the closed transport: a lost connection, not a defect of ours.
    """
    if not isinstance(error, (AttributeError, RuntimeError)):
        return False
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == redis_connection.__file__:
            return True
        traceback = traceback.tb_next
    return False
