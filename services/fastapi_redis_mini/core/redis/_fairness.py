"""Partition fairness: taking deliveries from every partition in turn.

Owns fair_share(), which RedisTaskQueue's reads and claims of several partitions go through,
so that no partition's entries wait behind the backlog of another.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from ..queue import Delivery
from .keys import Keys


async def fair_share(
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
