"""Process-wide tuning that every long-running process of the service applies once started."""

from __future__ import annotations

import gc

GC_THRESHOLDS = (7_000, 20, 100)
"""Generation thresholds for the cyclic garbage collector, instead of CPython's (700, 10, 10).

A request or a task in flight waits on Redis with its objects alive, and at the default
thresholds every collection walks them again: about a thousand collections for 20,000
requests, 45-60 µs of CPU per request on the api, half of what it then spent beyond a bare
FastAPI endpoint (`make api-ab AB_ARGS="--gc default"` shows it). Reference counting still frees
what is not in a cycle at once; only cycles live a little longer.
"""


def tune_gc() -> None:
    """Move everything built during start-up out of the collector's way, and collect less often.

    Call once, after start-up: what exists then (modules, the app, its schemas, the Redis
    client) lives as long as the process, so no collection needs to walk it again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
