"""The operator's side of RedisTaskQueue: the dead letters, read and replayed.

Owns OperatorSide, a base of RedisTaskQueue: dead_letters reads the entries that reached the
delivery limit, each named by its partition when there are several (_dead_letter_id), and
replay_dead_letters queues chosen ones again (_replay, with replay.lua). The admin command and
the console call them; the console's own reads and actions are console.py's.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.commands.core import AsyncScript

from ..queue import DeadLetter
from ._base import QueueBase, _translated
from .keys import Keys


class OperatorSide(QueueBase):
    """RedisTaskQueue's dead-letter calls (a base class, never made on its own)."""

    # Set by RedisTaskQueue.__init__.
    _replay_script: AsyncScript

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
