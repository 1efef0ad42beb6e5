"""The Redis Streams implementation of TaskQueue.

Every multi-step change of state is one Lua script (see lua/), so it is atomic, and batches
travel in one round trip: a worker's deliveries and outcomes, and the api's submits and reads
that meet in one process (see batching.Coalescer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, ParamSpec, TypeAlias, TypeVar

import orjson
import redis as sync_redis
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio import connection as redis_connection
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterError,
    CrossSlotTransactionError,
    InvalidPipelineStack,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..batching import Coalescer
from ..models import Task, TaskCreate
from ..queue import (
    CancelOutcome,
    DeadLetter,
    Delivery,
    Finish,
    FinishVerdict,
    Job,
    Outcome,
    QueueBusy,
    QueueState,
    QueueStats,
    QueueUnavailable,
    StartVerdict,
    SubmitOutcome,
    SubmitQuota,
    Submitted,
)
from ..settings import Settings
from .keys import Keys, Partitions

log = logging.getLogger(__name__)

# A single server's client, or a Redis Cluster's (REDIS_CLUSTER).
Client: TypeAlias = Redis | RedisCluster

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

P = ParamSpec("P")
T = TypeVar("T")


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


def _translated(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Raise the queue's own errors from a method, so no caller needs to know redis-py's."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            queue = args[0] if args else None
            if isinstance(queue, RedisTaskQueue) and queue.slots_unknown:
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


_IDLE_CONSUMER_MS = 3_600_000


async def check_durable_acks(settings: Settings) -> str | None:
    """At start: why the server cannot give the DURABLE_ACKS asked for, or None when it can.

    On a Redis Cluster every master is asked, since each acknowledges the writes of its slots.
    A server that cannot be reached is not judged (None, and a warning): the services start
    and wait for Redis as they always do.
    """
    if settings.durable_acks == "none":
        return None
    redis = connect(settings)
    try:
        if isinstance(redis, RedisCluster):
            await redis.initialize()
            for node in redis.get_primaries():
                problem = await _durability_problem(settings, node.execute_command, node.name)
                if problem is not None:
                    return problem
            return None
        return await _durability_problem(settings, redis.execute_command, "")
    except (RedisConnectionError, RedisTimeoutError, RedisClusterException) as error:
        log.warning("DURABLE_ACKS=%s not checked: Redis unreachable at start (%s)",
                    settings.durable_acks, error)  # fmt: skip
        return None
    finally:
        await redis.aclose()


async def _durability_problem(
    settings: Settings, execute: Callable[..., Awaitable[Any]], node: str
) -> str | None:
    """What one server (a cluster `node`, named in the answer) lacks for DURABLE_ACKS."""
    on = f" (cluster node {node})" if node else ""
    info = await execute("INFO", "server")
    version = info.get("valkey_version") and f"Valkey {info['valkey_version']}"
    version = version or f"Redis {info.get('redis_version', '?')}"
    if settings.durable_acks == "fsync":
        try:
            await execute("WAITAOF", 1, 0, 1)
        except ResponseError as error:
            if "appendonly" in str(error):
                return f"DURABLE_ACKS=fsync needs the Redis server's appendonly yes{on}"
            return (
                f"DURABLE_ACKS=fsync needs WAITAOF (Redis 7.2 or later, or Valkey); "
                f"the server is {version}{on}"
            )
        return None
    replication = await execute("INFO", "replication")
    if replication.get("role") != "master":
        return "DURABLE_ACKS=replica: REDIS_URL names a replica, which takes no writes"
    if not int(replication.get("connected_slaves", 0)):
        log.warning(
            "DURABLE_ACKS=replica but no replica is attached yet%s: submits answer 503 "
            "redis_no_replicas until one is", on
        )  # fmt: skip
    return None


def exit_unless_durable_acks(settings: Settings) -> None:
    """Entry-point helper: one line on stderr and exit 2 when DURABLE_ACKS cannot be given."""
    problem = asyncio.run(check_durable_acks(settings))
    if problem is not None:
        print(f"fastapi-redis-mini: invalid configuration: {problem}", file=sys.stderr)
        raise SystemExit(2)


def new_task_id() -> str:
    """122 random bits (UUID4), so task ids cannot be guessed."""
    return uuid.uuid4().hex


def is_cluster(settings: Settings) -> bool:
    """Whether REDIS_URL is a Redis Cluster: REDIS_CLUSTER, or with "auto" the server's own
    INFO cluster, asked once at start (a server that does not answer counts as a single one)."""
    if settings.redis_cluster != "auto":
        return settings.redis_cluster == "true"
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    probe = sync_redis.Redis.from_url(
        settings.redis_url, password=password, socket_connect_timeout=5, socket_timeout=5
    )
    try:
        return bool(int(probe.info("cluster").get("cluster_enabled", 0)))
    except sync_redis.RedisError as error:
        # Info, not a warning: the services go on to wait for Redis and say so themselves.
        log.info("REDIS_CLUSTER=auto: Redis unreachable at start (%s); using a single "
                 "server's client", error)  # fmt: skip
        return False
    finally:
        probe.close()


def connect(settings: Settings) -> Client:
    """One pooled client per process; commands are retried briefly on a dropped connection.

    The pool blocks (up to 5 s) when all REDIS_MAX_CONNECTIONS are busy instead of failing, so
    a burst of requests queues for a connection rather than erroring. On a Redis Cluster the
    cluster client finds every node from the one REDIS_URL names, and follows MOVED and ASK.
    """
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    options: dict[str, Any] = {
        "max_connections": settings.redis_max_connections,
        "password": password,
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": settings.redis_socket_timeout,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=1),
    }
    if is_cluster(settings):
        return RedisCluster.from_url(settings.redis_url, **options)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        timeout=5,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **options,
    )
    return Redis.from_pool(pool)


@dataclass(frozen=True, slots=True)
class _NewTask:
    task_id: str
    request: str
    signature: str
    scope: str
    idempotency_key: str | None
    traceparent: str
    replacing: str | None


def _quota(settings: Settings, tokens: int, reset_ms: int) -> SubmitQuota:
    return SubmitQuota(
        limit=settings.submit_burst_per_key,
        window_seconds=math.ceil(settings.submit_burst_per_key / settings.submit_rate_per_key),
        remaining=tokens,
        reset_seconds=math.ceil(reset_ms / 1000),
    )


def _age(entry_id: str, now_ms: int) -> float:
    """Seconds since a stream entry was added (its id starts with that time in ms)."""
    if not entry_id:
        return 0.0
    return max(0, now_ms - int(entry_id.split("-", 1)[0])) / 1000


def _load_script(redis: Client, name: str) -> AsyncScript:
    source = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
    return redis.register_script(source)


class RedisTaskQueue:
    """Tasks in `task:{id}` hashes, results in `cache:{signature}`, work in a consumer group.

    The keys form QUEUE_PARTITIONS partitions (see keys.Partitions), each with its own stream
    under its own hash tag: every script call touches the keys of one partition, and a call
    that concerns several partitions becomes one script call per partition, pipelined (a
    cluster client sends each node its share of the pipeline at once).
    """

    def __init__(self, redis: Client, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        cluster = isinstance(redis, RedisCluster)
        self.slots_unknown = cluster  # see learn_slots()
        self.partitions = Partitions.from_settings(settings, cluster=cluster)
        self.keys = self.partitions.all[0]  # the only partition's, with QUEUE_PARTITIONS=1
        # Sharded pub/sub on a cluster: a message stays on the shard of its partition instead
        # of being broadcast to every node.
        self._publish = "SPUBLISH" if cluster else "PUBLISH"
        # One name per thing: `_<name>_script` runs lua/<name>.lua; `read()` alone is XREADGROUP.
        self._submit_script = _load_script(redis, "submit")
        self._start_script = _load_script(redis, "start")
        self._finish_script = _load_script(redis, "finish")
        self._keep_alive_script = _load_script(redis, "keep_alive")
        self._promote_script = _load_script(redis, "promote")
        self._trim_script = _load_script(redis, "trim")
        self._cancel_script = _load_script(redis, "cancel")
        self._get_tasks_script = _load_script(redis, "get_tasks")
        self._replay_script = _load_script(redis, "replay")
        self._prune_script = _load_script(redis, "prune_consumers")
        self._stats_script = _load_script(redis, "stats")
        self._read_group_script = _load_script(redis, "read_group")
        events = [keys.events for keys in self.partitions.all]
        self._completions = _Subscription(redis, events, sharded=cluster, name="completions")
        # Workers of several partitions sleep until a submit announces new entries.
        self._work_announced = _Subscription(
            redis, [keys.work for keys in self.partitions.all], sharded=cluster, name="work"
        )
        # (consumer, partition) -> where its XAUTOCLAIM scan is
        self._claim_cursors: dict[tuple[str, int], str] = {}
        self._read_turn = 0  # the partition the next fair read starts at
        self._claim_turn = 0
        wait_ms = int(settings.durable_ack_timeout * 1000)
        self._durable_wait: tuple[str | int, ...] | None = {
            "none": None,
            "fsync": ("WAITAOF", 1, 0, wait_ms),
            "replica": ("WAIT", 1, wait_ms),
        }[settings.durable_acks]
        # The api's two hot paths: the submit() and get() calls that meet in one process go
        # to Redis together, one script call per batch (see Coalescer): submit() ->
        # _submit_coalescer -> _submit_many -> submit.lua; get() -> _get_coalescer ->
        # _get_many -> get_tasks.lua.
        # One pair of coalescers per partition, so a batch is one script call in one slot.
        self._submit_coalescers = [
            Coalescer(functools.partial(self._submit_many, keys)) for keys in self.partitions.all
        ]
        self._get_coalescers = [
            Coalescer(functools.partial(self._get_many, keys)) for keys in self.partitions.all
        ]

    async def _call(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script that records work acknowledged to someone; with DURABLE_ACKS, return
        only once the server confirms its writes reached the disk, or a replica.

        WAITAOF and WAIT count the writes of the connection they are sent on, so they go in
        one pipeline with the script, on its connection: one round trip, and one wait for the
        whole batch the script carries (a group commit).
        """
        if self._durable_wait is None:
            return await script(keys=keys, args=args)
        if isinstance(self.redis, RedisCluster):
            return await self._call_on_slot_master(self.redis, script, keys, args)
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command(*self._durable_wait)
                reply, confirmed = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError):
                # Redis lost its scripts (a restart): the script did not run; load it, again.
                await self.redis.script_load(script.script)
                continue
            for value in (reply, confirmed):
                if isinstance(value, Exception):
                    raise value
            self._check_confirmed(confirmed)
            return reply
        raise NoScriptError("the script vanished again right after it was loaded")

    async def _call_on_slot_master(
        self, cluster: RedisCluster, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        """_call on a Redis Cluster: the script and its wait, pipelined on one connection to
        the master serving the slot that all of the call's keys share.

        Not the cluster client's pipeline: it sends a keyless WAIT to any node, and sends a
        command redirected by MOVED again on its own, away from its wait. A slot that moved is
        looked up again (the script did not run); a lost master makes the client read the
        slots anew, and the caller gets QueueUnavailable to retry.
        """
        assert self._durable_wait is not None
        load = False
        for _ in range(3):
            await cluster.initialize()  # a no-op once the client knows the slots
            node: ClusterNode = cluster.get_node_from_key(keys[0])  # type: ignore[assignment]
            commands = [
                PipelineCommand(0, "EVALSHA", script.sha, len(keys), *keys, *args),
                PipelineCommand(1, *self._durable_wait),
            ]
            if load:
                commands.insert(0, PipelineCommand(0, "SCRIPT", "LOAD", script.script))
            await _pipeline_on(cluster, node, commands)
            reply, confirmed = commands[-2].result, commands[-1].result
            if isinstance(reply, NoScriptError):
                load = True  # this master lost its scripts: a restart, or a promoted replica
                continue
            if isinstance(reply, MovedError):
                await cluster.nodes_manager.move_slot(reply)
                continue
            if isinstance(reply, AskError):
                # A resharding moves the slot: the keys are split between two masters.
                raise QueueBusy(QueueState.TRY_AGAIN, f"slot {reply.slot_id} is being moved")
            for value in (*(c.result for c in commands[:-2]), reply, confirmed):
                if isinstance(value, Exception):
                    raise value
            self._check_confirmed(confirmed)
            return reply
        raise QueueBusy(QueueState.TRY_AGAIN, "the slot's master changed during the call")

    def _check_confirmed(self, confirmed: Any) -> None:
        timeout = self.settings.durable_ack_timeout
        if self.settings.durable_acks == "fsync":
            if int(confirmed[0]) < 1:
                raise QueueBusy(
                    QueueState.CANNOT_PERSIST,
                    f"the write was not confirmed on disk within {timeout:g} s "
                    "(DURABLE_ACKS=fsync, DURABLE_ACK_TIMEOUT)",
                )
        elif int(confirmed) < 1:
            raise QueueBusy(
                QueueState.NO_REPLICAS,
                f"no replica confirmed the write within {timeout:g} s "
                "(DURABLE_ACKS=replica, DURABLE_ACK_TIMEOUT)",
            )

    async def open(self) -> None:
        """Subscribe to completions, so that long-polls are woken as soon as a task finishes."""
        await self._completions.start()

    async def close(self) -> None:
        for submits in self._submit_coalescers:
            await submits.close()
        for gets in self._get_coalescers:
            await gets.close()
        await self._completions.close()
        await self._work_announced.close()
        await self.redis.aclose()

    async def learn_slots(self) -> None:
        """Have a new cluster client read the slot table before its first commands.

        It does so on its first command anyway, but the first commands of several partitions
        at once (the submit batches of a burst, say) race in redis-py and close each other's
        connections ("Connection closed by server"); one read, under the client's own lock,
        comes first instead.
        """
        assert isinstance(self.redis, RedisCluster)
        await self.redis.initialize()
        self.slots_unknown = False

    async def _execute(self, pipe: Any, *, raise_on_error: bool = True) -> list[Any]:
        """pipe.execute(), where a node's connection closed under a cluster pipeline counts as
        the node being unreachable: redis-py lets that surface as a RuntimeError from the
        closed transport (seen when every node died at once), not as a ConnectionError."""
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
        except RuntimeError as error:
            cluster = self.redis
            if not isinstance(cluster, RedisCluster) or "closed" not in str(error):
                raise
            # As after any lost node: idle connections go and busy ones reconnect when
            # released (nothing in flight on another connection is cut), and the slots are
            # read anew, so the next call finds the cluster as it is then.
            for node in cluster.get_nodes():
                node.update_active_connections_for_reconnect()
                await node.disconnect_free_connections()
            with contextlib.suppress(RedisError, RedisClusterException):
                await cluster.nodes_manager.initialize()
            raise RedisConnectionError(str(error)) from error
        return replies

    async def _call_each(
        self,
        script: AsyncScript,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
        *,
        durable: bool = False,
    ) -> list[Any]:
        """Run a script once per (keys, args), each call in one partition, in one pipeline.

        A single call goes as it did before partitions. With `durable` (an acknowledgement),
        DURABLE_ACKS' wait follows in the same pipeline: on a single server every call went
        on its connection, so one wait covers them all; on a cluster each call waits on its
        own master, all at once.
        """
        if len(calls) == 1:
            keys, args = calls[0]
            if durable:
                return [await self._call(script, keys, args)]
            return [await script(keys=keys, args=args)]
        wait = self._durable_wait if durable else None
        if wait is not None and isinstance(self.redis, RedisCluster):
            # Each call's wait must follow it on its own master's connection (_call does).
            return list(await asyncio.gather(*(self._call(script, k, a) for k, a in calls)))
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    # EVALSHA by name: a cluster pipeline refuses its evalsha() method.
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                if wait is not None:
                    pipe.execute_command(*wait)
                answers = await self._execute(pipe, raise_on_error=False)
            confirmed = answers.pop() if wait is not None else None
            missing = []
            for i, answer in zip(todo, answers, strict=True):
                if isinstance(answer, NoScriptError):
                    missing.append(i)
                elif isinstance(answer, Exception):
                    raise answer
                else:
                    replies[i] = answer
            if wait is not None:
                if isinstance(confirmed, Exception):
                    raise confirmed
                self._check_confirmed(confirmed)
            if not missing:
                return replies
            # A node without the script (a restart, a promoted replica): load it everywhere
            # and run again only the calls that did not run, since the others must not run
            # twice (a start run twice would find its own tasks running).
            await self.redis.script_load(script.script)
            todo = missing
        raise NoScriptError("the script vanished again right after it was loaded")

    # -- the api side

    async def submit(
        self,
        request: TaskCreate,
        *,
        signature: str,
        scope: str = "",
        idempotency_key: str | None = None,
        traceparent: str = "",
        replacing: str | None = None,
    ) -> Submitted:
        keys = self.partitions.of_submit(signature, scope, idempotency_key)
        task = _NewTask(
            task_id=self.partitions.new_task_id(keys),
            request=request.canonical.decode(),
            signature=signature,
            scope=scope,
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            replacing=replacing,
        )
        return await self._submit_coalescers[keys.index](task)

    # Translated once per batch rather than once per submit: the coalescer raises the batch's
    # error in every submit of it.
    @_translated
    async def _submit_many(self, partition: Keys, tasks: Sequence[_NewTask]) -> list[Submitted]:
        s = self.settings
        # Quotas are per API key; without a key (scope "") there is nothing to count.
        quotas = s.quotas
        keys = [partition.stream]
        batch = []
        for t in tasks:
            keys += (
                partition.task(t.task_id),
                partition.cache(t.signature, t.scope),
                partition.idempotency(t.idempotency_key or "", t.scope),
            )
            if quotas:
                keys += (partition.submit_quota(t.scope), partition.unfinished(t.scope))
            keyed: int | str = 0 if t.idempotency_key is None else (t.replacing or 1)
            batch.append(
                {
                    "task_id": t.task_id,
                    "request": t.request,
                    "signature": t.signature,
                    "scope": t.scope,
                    "trace": t.traceparent,
                    "idempotency": keyed,
                }
            )
        reply = await self._call(
            self._submit_script,
            keys,
            args=[repr(time.time()), s.cache_ttl, s.result_expiry, s.idempotency_ttl,
                  repr(s.submit_rate_per_key), s.submit_burst_per_key, s.max_unfinished_per_key,
                  int(quotas), orjson.dumps(batch),
                  partition.work if len(self.partitions) > 1 else "", self._publish],
        )  # fmt: skip
        submitted = []
        for answer in orjson.loads(reply):
            outcome = SubmitOutcome(answer["outcome"])
            tokens = answer["tokens"]
            submitted.append(
                Submitted(
                    task_id=answer["task_id"],
                    outcome=outcome,
                    result=orjson.loads(answer["result"])
                    if outcome is SubmitOutcome.CACHED
                    else None,
                    quota=_quota(s, tokens, answer["reset_ms"]) if tokens >= 0 else None,
                )
            )
        return submitted

    @_translated
    async def get(self, task_id: str, scope: str = "") -> Task | None:
        partition = self.partitions.of_task(task_id)
        if partition is None:
            return None
        fields = await self._get_coalescers[partition.index](task_id)
        if "status" not in fields or fields.get("scope", "") != scope:
            return None
        if "result" in fields:
            fields["result"] = orjson.loads(fields["result"])
        fields["task_id"] = task_id
        return Task.model_validate(fields)

    async def _get_many(self, partition: Keys, task_ids: Sequence[str]) -> list[dict[str, Any]]:
        reply = await self._get_tasks_script(keys=[partition.task(t) for t in task_ids])
        tasks: list[dict[str, Any]] = orjson.loads(reply)
        return tasks

    @_translated
    async def wait(self, task_id: str, scope: str, seconds: float) -> Task | None:
        async with self._completions.watch(task_id) as finished:
            deadline = time.monotonic() + seconds
            while True:
                task = await self.get(task_id, scope)
                remaining = deadline - time.monotonic()
                if task is None or task.status.is_final or remaining <= 0:
                    return task
                # The notification is the fast path; the periodic re-read only covers a
                # notification lost while the subscriber was reconnecting.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), min(remaining, 5.0))
                finished.clear()

    @_translated
    async def cancel(self, task_id: str, scope: str = "") -> CancelOutcome:
        partition = self.partitions.of_task(task_id)
        if partition is None:
            return CancelOutcome.NOT_FOUND
        # A cancel's 202 is an acknowledgement too: with DURABLE_ACKS it waits like a submit.
        reply = await self._call(
            self._cancel_script,
            [partition.task(task_id), partition.unfinished(scope)],
            args=[scope, repr(time.time()), partition.events, task_id, self._publish],
        )
        return CancelOutcome(reply)

    @_translated
    async def stats(self) -> QueueStats:
        parts = self.partitions.all
        replies = await self._call_each(
            self._stats_script,
            [([k.stream, k.dead_letter, k.retries], [k.group]) for k in parts],
        )
        each = tuple(
            _partition_stats(keys, reply) for keys, reply in zip(parts, replies, strict=True)
        )
        if len(each) == 1:
            return dataclasses.replace(each[0], partition=None)
        return QueueStats(
            stream=self.settings.queue_key,
            group=self.settings.consumer_group,
            stream_length=sum(p.stream_length for p in each),
            lag=sum(p.lag for p in each),
            pending=sum(p.pending for p in each),
            dead_letter_length=sum(p.dead_letter_length for p in each),
            # Every worker is a consumer of every partition's group.
            consumers=max(p.consumers for p in each),
            oldest_undelivered_age=max(p.oldest_undelivered_age for p in each),
            oldest_pending_age=max(p.oldest_pending_age for p in each),
            retry_size=sum(p.retry_size for p in each),
            partitions=each,
        )

    @_translated
    async def check_writable(self) -> None:
        # A write, not a PING: a server that answers but refuses writes (OOM, READONLY,
        # MISCONF, ...) can take neither a submit nor an outcome, so it is not ready. Every
        # partition's, as on a cluster they sit on different masters.
        if len(self.partitions) == 1:
            await self.redis.set(self.keys.probe, "1", px=10_000)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in self.partitions.all:
                pipe.set(keys.probe, "1", px=10_000)
            await self._execute(pipe)

    # -- the worker side

    @_translated
    async def ensure_group(self) -> None:
        for keys in self.partitions.all:
            try:
                await self.redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    @_translated
    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        if len(self.partitions) == 1:
            return await self._read_blocking(consumer, count, block_ms)
        # A blocking read cannot wait on streams of several slots, so a worker reads every
        # partition without blocking and, finding nothing, sleeps until a submit announces new
        # entries (or block_ms passes: the announcement is only the fast path). The flag is
        # cleared before the reads, so an announcement that comes during them is not missed.
        await self._work_announced.start()
        self._work_announced.clear()
        deliveries = await self._read_fairly(consumer, count)
        if deliveries:
            return deliveries
        await self._work_announced.wait(block_ms / 1000)
        return await self._read_fairly(consumer, count)

    async def _read_blocking(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        try:
            reply: Any = await self.redis.xreadgroup(
                self.keys.group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            # The group vanished (a Redis restart without persistence): make it again.
            await self.ensure_group()
            return []
        if not reply:
            return []
        return _deliveries(reply[0][1])

    async def _read_fairly(self, consumer: str, count: int) -> list[Delivery]:
        async def read_group(shares: list[tuple[Keys, int]]) -> list[list[Delivery]]:
            replies = await self._call_each(
                self._read_group_script,
                [([keys.stream], [keys.group, consumer, share]) for keys, share in shares],
            )
            return [
                [Delivery(entry_id=r[i], task_id=r[i + 1]) for i in range(0, len(r), 2)]
                for r in replies
            ]

        deliveries, self._read_turn = await _fair_share(
            self.partitions.all, self._read_turn, count, read_group
        )
        return deliveries

    @_translated
    async def claim_idle(self, consumer: str, count: int) -> list[Delivery]:
        min_idle_ms = int(self.settings.claim_idle * 1000)

        async def claim(shares: list[tuple[Keys, int]]) -> list[list[Delivery]]:
            # The scan goes on where the last one stopped, so idle entries far down the
            # pending list are reached too instead of waiting behind the first live ones.
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, share in shares:
                    cursor = self._claim_cursors.get((consumer, keys.index), "0-0")
                    pipe.xautoclaim(keys.stream, keys.group, consumer, min_idle_ms, cursor,
                                    count=share)  # fmt: skip
                replies = await self._execute(pipe)
            claimed = []
            for (keys, _), reply in zip(shares, replies, strict=True):
                self._claim_cursors[(consumer, keys.index)] = reply[0]
                claimed.append(_deliveries(reply[1]))
            return claimed

        deliveries, self._claim_turn = await _fair_share(
            self.partitions.all, self._claim_turn, count, claim
        )
        return deliveries

    def _by_partition(self, task_ids: Sequence[str]) -> dict[int, list[int]]:
        """The positions of task_ids grouped by partition, in order; ids of none are left out."""
        groups: dict[int, list[int]] = {}
        for position, task_id in enumerate(task_ids):
            keys = self.partitions.of_task(task_id)
            if keys is not None:
                groups.setdefault(keys.index, []).append(position)
        return groups

    @_translated
    async def start(
        self, consumer: str, deliveries: Sequence[Delivery], *, alone: bool = False
    ) -> list[Job]:
        if not deliveries:
            return []
        now = time.time()
        groups = self._by_partition([d.task_id for d in deliveries])
        calls = []
        for index, positions in groups.items():
            keys = self.partitions.all[index]
            batch = [deliveries[i] for i in positions]
            calls.append((
                [keys.stream, keys.dead_letter, *(keys.task(d.task_id) for d in batch)],
                # The batch travels as one JSON argument: encoding one string is far cheaper
                # for the client than encoding hundreds of separate arguments.
                [keys.group, consumer, repr(now), self.settings.max_deliveries, int(alone),
                 orjson.dumps([(d.entry_id, d.task_id) for d in batch]),
                 self.settings.result_expiry, keys.events, self.settings.dead_letter_maxlen,
                 self._publish],
            ))  # fmt: skip
        rows: list[dict[str, Any]] = [{"verdict": "skip"}] * len(deliveries)
        for positions, reply in zip(
            groups.values(), await self._call_each(self._start_script, calls), strict=True
        ):
            for position, row in zip(positions, orjson.loads(reply), strict=True):
                rows[position] = row
        jobs = []
        ended: list[Job] = []
        for d, row in zip(deliveries, rows, strict=True):
            verdict = StartVerdict(row["verdict"])
            job = Job(entry_id=d.entry_id, task_id=d.task_id, verdict=verdict, started_at=now)
            if verdict in (StartVerdict.DEAD, StartVerdict.CANCELLED):
                job.scope = row["scope"]
                ended.append(job)
            if verdict is StartVerdict.RUN:
                request = orjson.loads(row["request"])
                job.prompt = request["prompt"]
                job.params = request["params"]
                job.signature = row["signature"]
                job.scope = row["scope"]
                job.traceparent = row["traceparent"]
                job.created_at = float(row["created_at"])
                job.attempts = int(row["attempts"])
            jobs.append(job)
        if ended and self.settings.max_unfinished_per_key:
            await self._forget_unfinished(ended)
        return jobs

    async def _forget_unfinished(self, jobs: Sequence[Job]) -> None:
        """Take tasks start.lua ended off their API key's set of unfinished tasks.

        start.lua cannot: the set's name follows from the task's scope, which the script only
        learns by reading the task. Best effort, and rare (a dead letter, or a cancel that
        outlived its worker): an entry left behind still drops out at RESULT_EXPIRY. (Quotas
        come with a single partition, whose keys these are.)
        """
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.zrem(self.keys.unfinished(job.scope), job.task_id)
                await self._execute(pipe)
        except RedisError as error:
            log.warning("could not update the unfinished-task counts: %s", error)

    @_translated
    async def finish(self, consumer: str, finishes: Sequence[Finish]) -> list[FinishVerdict]:
        if not finishes:
            return []
        groups = self._by_partition([f.job.task_id for f in finishes])
        calls = []
        now = repr(time.time())
        for index, positions in groups.items():
            p = self.partitions.all[index]
            keys = [p.stream, p.retries]
            batch = []
            for f in (finishes[i] for i in positions):
                job = f.job
                keys += (p.task(job.task_id), p.cache(job.signature, job.scope),
                         p.unfinished(job.scope))  # fmt: skip
                payload = f.result.decode() if f.outcome is Outcome.DONE else (f.error or "")
                batch.append((job.entry_id, job.task_id, f.outcome.value, payload, f.due_at))
            calls.append((
                keys,
                [p.group, consumer, now, self.settings.cache_ttl, p.events,
                 self.settings.result_expiry, orjson.dumps(batch), self._publish],
            ))  # fmt: skip
        verdicts = [FinishVerdict.LOST] * len(finishes)
        replies = await self._call_each(self._finish_script, calls, durable=True)
        for positions, reply in zip(groups.values(), replies, strict=True):
            for position, verdict in zip(positions, reply, strict=True):
                verdicts[position] = FinishVerdict(verdict)
        return verdicts

    @_translated
    async def keep_alive(self, consumer: str, jobs: Sequence[Job]) -> list[str]:
        if not jobs:
            return []
        groups = self._by_partition([j.task_id for j in jobs])
        calls = []
        for index, positions in groups.items():
            keys = self.partitions.all[index]
            calls.append((
                [keys.stream, *(keys.task(jobs[i].task_id) for i in positions)],
                [keys.group, consumer, *(jobs[i].entry_id for i in positions)],
            ))  # fmt: skip
        answers = ["lost"] * len(jobs)
        replies = await self._call_each(self._keep_alive_script, calls)
        for positions, reply in zip(groups.values(), replies, strict=True):
            for position, answer in zip(positions, reply, strict=True):
                answers[position] = answer
        return answers

    @_translated
    async def promote_due_retries(self, limit: int) -> int:
        # Two round trips, once per maintenance pass: the script must name each task's key,
        # so the due ids are read first. The script checks again that each is still due.
        now = repr(time.time())
        parts = self.partitions.all
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in parts:
                pipe.zrangebyscore(keys.retries, "-inf", now, start=0, num=limit)
            due_per_partition: list[list[str]] = await self._execute(pipe)
        calls = [
            ([keys.retries, keys.stream, *map(keys.task, due)], [now, *due])
            for keys, due in zip(parts, due_per_partition, strict=True)
            if due
        ]
        if not calls:
            return 0
        return sum(int(n) for n in await self._call_each(self._promote_script, calls))

    @_translated
    async def trim(self) -> int:
        parts = self.partitions.all
        removed = await self._call_each(self._trim_script, [([k.stream], []) for k in parts])
        await self._call_each(
            self._prune_script, [([k.stream], [k.group, "", _IDLE_CONSUMER_MS]) for k in parts]
        )
        return sum(int(n) for n in removed)

    @_translated
    async def leave(self, consumer: str) -> None:
        await self._call_each(
            self._prune_script,
            [([k.stream], [k.group, consumer, _IDLE_CONSUMER_MS]) for k in self.partitions.all],
        )

    # -- operators

    def _dead_letter_id(self, keys: Keys, entry_id: str) -> str:
        """An entry id of a dead-letter stream, naming its partition when there are several."""
        return entry_id if len(self.partitions) == 1 else f"{keys.index}/{entry_id}"

    @_translated
    async def dead_letters(self, count: int) -> list[DeadLetter]:
        letters: list[DeadLetter] = []
        for keys in self.partitions.all:
            if len(letters) >= count:
                break
            entries: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
                keys.dead_letter, count=count - len(letters)
            )
            letters += [
                DeadLetter(
                    entry_id=self._dead_letter_id(keys, entry_id),
                    task_id=fields.get("task_id", ""),
                    fields=fields,
                )
                for entry_id, fields in entries
            ]
        return letters

    @_translated
    async def replay_dead_letters(self, entry_ids: Sequence[str]) -> int:
        # "<partition>/<entry id>" with several partitions (see _dead_letter_id).
        several = len(self.partitions) > 1
        per_partition: dict[int, list[str]] = {}
        for entry_id in entry_ids:
            named, _, stream_id = entry_id.rpartition("/")
            if not several and not named:
                per_partition.setdefault(0, []).append(stream_id)
            elif several and named.isdigit() and int(named) < len(self.partitions):
                per_partition.setdefault(int(named), []).append(stream_id)
        replayed = 0
        for index, stream_ids in per_partition.items():
            replayed += await self._replay(self.partitions.all[index], stream_ids)
        return replayed

    async def _replay(self, keys: Keys, entry_ids: Sequence[str]) -> int:
        found = []
        for entry_id in entry_ids:
            entries: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
                keys.dead_letter, entry_id, entry_id
            )
            if entries:
                found.append((entry_id, entries[0][1].get("task_id", "")))
        if not found:
            return 0
        return int(
            await self._replay_script(
                keys=[
                    keys.dead_letter,
                    keys.stream,
                    *(keys.task(task_id) for _, task_id in found),
                ],
                args=[*(e for e, _ in found), *(t for _, t in found)],
            )
        )


async def _pipeline_on(
    cluster: RedisCluster, node: ClusterNode, commands: list[PipelineCommand]
) -> None:
    """Send `commands` on one connection to `node`; each command's reply or error lands in
    its `result`. A lost connection raises, after the client is told to read the slots anew,
    as its own commands do, so that the next call finds a replica promoted meanwhile."""
    try:
        await node.execute_pipeline(commands)
    except AttributeError as error:
        # The cluster client disconnects every connection, in use or not, when one of its own
        # commands meets CLUSTERDOWN (a failover under way): a pipeline caught between its
        # connect and its write finds the socket gone.
        raise RedisConnectionError(
            f"{node.name}: the connection was closed under the call"
        ) from error
    except (RedisConnectionError, RedisTimeoutError) as error:
        if isinstance(error, MaxConnectionsError):
            raise
        # Idle connections go, busy ones reconnect when released; unlike the client's own
        # aclose(), nothing in flight on another connection is cut.
        node.update_active_connections_for_reconnect()
        await node.disconnect_free_connections()
        cluster.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
        with contextlib.suppress(RedisError, RedisClusterException):
            # Mid-failover the nodes may not agree yet; the next call asks again.
            await cluster.nodes_manager.initialize(last_failed_node_name=node.name)
        raise


def _partition_stats(keys: Keys, reply: str) -> QueueStats:
    stats = orjson.loads(reply)
    length, now_ms = int(stats["stream_length"]), int(stats["now_ms"])
    return QueueStats(
        stream=keys.stream,
        group=keys.group,
        stream_length=length,
        # Lag is undefined after deletions past the group's position; the stream length is
        # then the safe upper bound.
        lag=int(stats["lag"]) if int(stats["lag"]) >= 0 else length,
        pending=int(stats["pending"]) if stats["group_found"] else 0,
        dead_letter_length=int(stats["dead_letter_length"]),
        consumers=int(stats["consumers"]),
        oldest_undelivered_age=_age(stats["oldest_undelivered"], now_ms),
        oldest_pending_age=_age(stats["oldest_pending"], now_ms),
        retry_size=int(stats["retry_size"]),
        partition=keys.index,
    )


async def _fair_share(
    partitions: Sequence[Keys],
    turn: int,
    count: int,
    fetch: Callable[[list[tuple[Keys, int]]], Awaitable[list[list[Delivery]]]],
) -> tuple[list[Delivery], int]:
    """Up to `count` deliveries taken fairly from every partition; returns them and the turn
    to start at next time.

    Each round asks the partitions not asked yet, starting at `turn`, for an equal share of
    what is still wanted (one pipelined call per round); once every partition was asked, the
    ones that gave their whole share are asked for the rest. So no partition waits behind the
    backlog of another: with fewer wanted than there are partitions, successive calls go round
    them in turn, and with more, each gets its share first.
    """
    n = len(partitions)
    unasked = [partitions[(turn + i) % n] for i in range(n)]
    first_round = min(count, n)
    fuller: list[Keys] = []
    found: list[Delivery] = []
    while len(found) < count and (unasked or fuller):
        wanted = count - len(found)
        if unasked:
            asked, unasked = unasked[:wanted], unasked[wanted:]
        else:
            asked, fuller = fuller[:wanted], fuller[wanted:]
        base, extra = divmod(wanted, len(asked))
        shares = [(keys, base + (i < extra)) for i, keys in enumerate(asked)]
        for (keys, share), got in zip(shares, await fetch(shares), strict=True):
            found += got
            if len(got) >= share:
                fuller.append(keys)
    return found, (turn + (first_round if first_round < n else 1)) % n


def _deliveries(entries: Sequence[Any]) -> list[Delivery]:
    # An entry trimmed or deleted after delivery comes back without fields; it has no task.
    return [
        Delivery(entry_id=entry_id, task_id=fields["task_id"])
        for entry_id, fields in entries
        if fields and "task_id" in fields
    ]


class _Subscription:
    """One Pub/Sub subscription per process to a set of channels (one per partition).

    It wakes the long-polls waiting on a task (`watch`; messages carry task ids) or a worker
    waiting for new entries (`wait`). On a cluster the channels are shard channels
    (SSUBSCRIBE), each on the master of its partition.
    """

    def __init__(self, redis: Client, channels: Sequence[str], *, sharded: bool, name: str) -> None:
        self._redis = redis
        self._channels = list(channels)
        self._sharded = sharded
        self._name = name
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._announced = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name=f"{self._name}-listener")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), 5.0)

    def clear(self) -> None:
        self._announced.clear()

    async def wait(self, seconds: float) -> None:
        """Return once a message came since the last clear(), or after `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._announced.wait(), seconds)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        if self._listener is None:
            await self.start()
        event = asyncio.Event()
        self._waiters.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiters.get(task_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[task_id]

    def _heard(self, data: str) -> None:
        self._announced.set()
        if self._waiters:
            for task_id in data.split():
                for event in self._waiters.get(task_id, ()):
                    event.set()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub: PubSub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                if isinstance(self._redis, RedisCluster):
                    # A cluster client learns the slots on its first command; the pub/sub
                    # needs them to pick a node, and may come first.
                    await self._redis.initialize()
                if self._sharded:
                    await pubsub.ssubscribe(*self._channels)
                else:
                    await pubsub.subscribe(*self._channels)
                self._subscribed.set()
                backoff = 0.1
                while True:
                    if self._sharded:
                        # The cluster's pub/sub polls each node's connection in turn, for the
                        # timeout each: a short one keeps every shard's messages prompt.
                        message = await pubsub.get_sharded_message(  # type: ignore[attr-defined]
                            ignore_subscribe_messages=True, timeout=0.05
                        )
                    else:
                        message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] in ("message", "smessage"):
                        self._heard(message["data"])
            except Exception as error:
                # Whatever went wrong, subscribing again is all there is to do, so this loop
                # never ends on its own; meanwhile long-polls read the task every 5 s, and
                # workers read every partition once a second.
                self._subscribed.clear()
                if isinstance(error, (RedisError, RedisClusterException)) or torn_down(error):
                    log.warning("%s subscription failed (%s); retrying", self._name, error)
                else:
                    log.exception("%s listener failed; subscribing again", self._name)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            # A cancel landing inside a Redis read can be swallowed by the client: wait for
            # the listener a bounded time rather than forever.
            await asyncio.wait([self._listener], timeout=2)
            self._listener = None
