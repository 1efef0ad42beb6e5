"""Slot routing and pipelines: how a script call reaches the node that serves its keys.

Owns SlotRouting, the part of RedisTaskQueue that sends its script calls: one call, with
DURABLE_ACKS' wait on the same connection (_call; on a cluster, on the master of the call's
slot); several partitions' calls in one pipeline (_call_each), or one pipeline per master so that
a master's failure stays its own partitions' (_call_each_isolated); a pipeline whose cluster
connection was closed under it (_execute); the slot table a new cluster client reads first
(learn_slots); and task ids grouped by partition (_by_partition). What DURABLE_ACKS waits for
and how its answer is judged are _durability's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..queue import QueueBusy, QueueState, QueueUnavailable
from ..settings import Settings
from ._connect import Client
from ._durability import check_confirmed
from ._errors import queue_error, torn_down
from .keys import Partitions


class SlotRouting:
    """RedisTaskQueue's script calls and pipelines (a base class, never made on its own)."""

    # Set by RedisTaskQueue.__init__.
    redis: Client
    settings: Settings
    partitions: Partitions
    slots_unknown: bool
    _durable_wait: tuple[str | int, ...] | None

    def _witness(self, key: str) -> tuple[str | int, ...]:
        """A write to send right before DURABLE_ACKS' wait, in the partition of `key`.

        WAIT and WAITAOF confirm the writes of their own connection up to its last one. A
        script that wrote nothing (a retry that finds its own earlier write, sent on another
        connection and never confirmed) would be confirmed at once; this write comes after
        every earlier one on its master, so its confirmation covers them all.
        """
        partition = next(k for k in self.partitions.all if key.startswith(k.prefix))
        return ("SET", partition.probe, "1", "PX", 10_000)

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
                pipe.execute_command(*self._witness(keys[0]))
                pipe.execute_command(*self._durable_wait)
                reply, witnessed, confirmed = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError):
                # Redis lost its scripts (a restart): the script did not run; load it, again.
                await self.redis.script_load(script.script)
                continue
            for value in (reply, witnessed, confirmed):
                if isinstance(value, Exception):
                    raise value
            check_confirmed(self.settings, confirmed)
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
                PipelineCommand(1, *self._witness(keys[0])),
                PipelineCommand(2, *self._durable_wait),
            ]
            if load:
                commands.insert(0, PipelineCommand(0, "SCRIPT", "LOAD", script.script))
            await _pipeline_on(cluster, node, commands)
            reply, confirmed = commands[-3].result, commands[-1].result
            if isinstance(reply, NoScriptError):
                load = True  # this master lost its scripts: a restart, or a promoted replica
                continue
            if isinstance(reply, MovedError):
                await cluster.nodes_manager.move_slot(reply)
                continue
            if isinstance(reply, AskError):
                # A resharding moves the slot: the keys are split between two masters.
                raise QueueBusy(QueueState.TRY_AGAIN, f"slot {reply.slot_id} is being moved")
            for value in (*(c.result for c in commands[:-3]), commands[-2].result, confirmed):
                if isinstance(value, Exception):
                    raise value
            check_confirmed(self.settings, confirmed)
            return reply
        raise QueueBusy(QueueState.TRY_AGAIN, "the slot's master changed during the call")

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
                    pipe.execute_command(*self._witness(calls[0][0][0]))
                    pipe.execute_command(*wait)
                answers = await self._execute(pipe, raise_on_error=False)
            confirmed = answers.pop() if wait is not None else None
            witnessed = answers.pop() if wait is not None else None
            if isinstance(witnessed, Exception):
                raise witnessed
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
                check_confirmed(self.settings, confirmed)
            if not missing:
                return replies
            # A node without the script (a restart, a promoted replica): load it everywhere
            # and run again only the calls that did not run, since the others must not run
            # twice (a start run twice would find its own tasks running).
            await self.redis.script_load(script.script)
            todo = missing
        raise NoScriptError("the script vanished again right after it was loaded")

    async def _call_each_isolated(
        self,
        script: AsyncScript,
        calls: Sequence[tuple[Sequence[str], Sequence[Any]]],
        *,
        durable: bool = False,
    ) -> list[Any]:
        """_call_each where a master's failure stays with its own partitions: each call's
        reply, or the QueueUnavailable that kept it from running or from being confirmed.

        On a single server every partition lives on the one server, so a failure is every
        call's and is raised, as by _call_each. On a cluster the calls go in one pipeline per
        master, all at once, each ending with DURABLE_ACKS' wait when `durable` (one wait per
        master covers its calls): a master that is unreachable, refuses, or has no replica to
        confirm fails only its own calls. A call whose script ran but was not confirmed is
        failed too; the caller retries it, and the scripts are idempotent for that.
        """
        cluster = self.redis
        if not isinstance(cluster, RedisCluster):
            return await self._call_each(script, calls, durable=durable)
        wait = self._durable_wait if durable else None
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        load_on: set[str] = set()  # masters that lost the script: load it there first
        for _ in range(3):
            await cluster.initialize()  # a no-op once the client knows the slots
            per_node: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in todo:
                try:
                    node = cluster.get_node_from_key(calls[i][0][0])
                except (RedisError, RedisClusterException) as error:
                    replies[i] = error
                    continue
                if node is None:
                    replies[i] = QueueUnavailable(
                        QueueState.CLUSTER_DOWN, "no node serves the slot"
                    )
                    continue
                per_node.setdefault(node.name, (node, []))[1].append(i)

            async def send(node: ClusterNode, positions: list[int]) -> list[PipelineCommand]:
                commands = [
                    PipelineCommand(i, "EVALSHA", script.sha, len(calls[i][0]), *calls[i][0],
                                    *calls[i][1])
                    for i in positions
                ]  # fmt: skip
                if node.name in load_on:
                    commands.insert(0, PipelineCommand(-1, "SCRIPT", "LOAD", script.script))
                if wait is not None:
                    commands.append(PipelineCommand(-1, *self._witness(calls[positions[0]][0][0])))
                    commands.append(PipelineCommand(-1, *wait))
                await _pipeline_on(cluster, node, commands)
                return commands

            sent = list(per_node.values())
            results = await asyncio.gather(
                *(send(node, positions) for node, positions in sent), return_exceptions=True
            )
            again: list[int] = []
            for (node, positions), result in zip(sent, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result
                    for i in positions:
                        replies[i] = result
                    continue
                unconfirmed: Exception | None = None
                if wait is not None:
                    confirmed = result.pop().result
                    witnessed = result.pop().result
                    if isinstance(witnessed, Exception):
                        unconfirmed = witnessed
                    elif isinstance(confirmed, Exception):
                        unconfirmed = confirmed
                    else:
                        try:
                            check_confirmed(self.settings, confirmed)
                        except QueueBusy as error:
                            unconfirmed = error
                if node.name in load_on:
                    load_on.discard(node.name)
                    result.pop(0)
                for i, command in zip(positions, result, strict=True):
                    answer = command.result
                    if isinstance(answer, NoScriptError):
                        load_on.add(node.name)
                        again.append(i)
                    elif isinstance(answer, MovedError):
                        await cluster.nodes_manager.move_slot(answer)
                        again.append(i)
                    elif isinstance(answer, AskError):
                        replies[i] = QueueBusy(
                            QueueState.TRY_AGAIN, f"slot {answer.slot_id} is being moved"
                        )
                    else:
                        replies[i] = (
                            answer if isinstance(answer, Exception) else unconfirmed or answer
                        )
            todo = again
            if not todo:
                break
        for i in todo:
            replies[i] = QueueBusy(
                QueueState.TRY_AGAIN, "the slot's master changed during the call"
            )
        return [_unavailable(reply) if isinstance(reply, Exception) else reply for reply in replies]

    def _by_partition(self, task_ids: Sequence[str]) -> dict[int, list[int]]:
        """The positions of task_ids grouped by partition, in order; ids of none are left out."""
        groups: dict[int, list[int]] = {}
        for position, task_id in enumerate(task_ids):
            keys = self.partitions.of_task(task_id)
            if keys is not None:
                groups.setdefault(keys.index, []).append(position)
        return groups


def _unavailable(error: Exception) -> QueueUnavailable:
    """The QueueUnavailable a failed call stands for; a defect of ours is raised instead."""
    if isinstance(error, QueueUnavailable):
        return error
    if torn_down(error):
        return QueueUnavailable(QueueState.UNREACHABLE, f"a connection closed during the call "
                                f"({type(error).__name__}: {error})")  # fmt: skip
    if isinstance(error, (RedisError, RedisClusterException)):
        translated = queue_error(error)
        if translated is not None:
            return translated
    raise error


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
