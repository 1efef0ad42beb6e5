"""Where an unkeyed submit goes while its own partition cannot confirm it.

Owns AvoidedPartitions: the partitions whose submits failed lately (a master that is
unreachable, whose slots are down, or that has no replica to confirm with DURABLE_ACKS=replica),
each remembered for AVOID_SECONDS, and the choice of a partition on another master to take an
unkeyed submit instead. A task may live in any partition (its id names which), so this only
changes where a new task is stored; a submit with an Idempotency-Key is never moved.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Collection

# Long enough that a master which cannot confirm costs one DURABLE_ACK_TIMEOUT per api process
# every few seconds, not one per submit; short enough that a recovered partition takes its
# own submits again (and serves their cache lookups) soon after.
AVOID_SECONDS = 5.0


class AvoidedPartitions:
    """Partitions to keep unkeyed submits away from, each until its time runs out."""

    def __init__(
        self, seconds: float = AVOID_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds = seconds
        self._clock = clock
        self._until: dict[int, float] = {}

    def avoid(self, index: int) -> bool:
        """Avoid a partition from now on for `seconds`; True when it was not avoided yet."""
        fresh = not self.avoids(index)
        self._until[index] = self._clock() + self.seconds
        return fresh

    def avoids(self, index: int) -> bool:
        until = self._until.get(index)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[index]
            return False
        return True

    def alternative(
        self,
        home: int,
        signature: str,
        count: int,
        master_of: Callable[[int], str | None],
        tried: Collection[int] = (),
    ) -> int | None:
        """A partition of `count` to take a submit that `home` cannot: not avoided, not tried,
        and on another master than `home` (`master_of` names a partition's master, None when
        unknown), picked by `signature` so that submits spread over the candidates."""
        home_master = master_of(home)
        candidates = [
            index
            for index in range(count)
            if index != home
            and index not in tried
            and not self.avoids(index)
            and (home_master is None or master_of(index) != home_master)
        ]
        if not candidates:
            return None
        return candidates[zlib.crc32(signature.encode()) % len(candidates)]
