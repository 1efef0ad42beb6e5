"""Loopback ports, picked when needed, never fixed: several runs share one machine.

Servers listen on ports below the kernel's ephemeral range (32768-60999 by default). A port
the kernel hands out for bind(0) is one it also hands out as the local port of outgoing
connections, and to every other process asking for one: between the pick and the server's
bind, a client socket or another test process could take it (seen: an api that found its
port held for five seconds). Below that range only a listener that asks for a port by
number can hold one, and each pytest-xdist process takes its ports from a share of its own,
so two processes of one run never pick the same port.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Collection

# Below redis_cluster.PORT_RANGE (12000-22700) and its bus ports (+10000).
LISTEN_RANGE = range(2000, 12000)
# Never handed out: the ports the service and its tools listen on by default. A service
# started with one port picked here and another left at its default would otherwise, now and
# then, get both the same (seen: API_METRICS_PORT picked as 9100, the default METRICS_PORT,
# which the api refuses at start). Redis, the api, the worker's and the api's metrics, the
# Locust UI, Prometheus, Alertmanager and the Redis exporter.
DEFAULT_PORTS = frozenset({6379, 8000, 9100, 9101, 8089, 9090, 9093, 9121})
# Never handed out either: the ports of LISTEN_RANGE that Chromium refuses to open
# (net::ERR_UNSAFE_PORT), found by opening every port of the range in the suite's chromium. A
# server a browser test opens must not get one (seen: a console api on 6697).
BROWSER_UNSAFE_PORTS = frozenset(
    {2049, 3659, 4045, 5060, 5061, 6000, 6566, *range(6665, 6670), 6697, 10080}
)
# Ports this process has handed out and may not have bound yet: not handed out again until
# half of the share has been.
_given: set[int] = set()
_NEVER = DEFAULT_PORTS | BROWSER_UNSAFE_PORTS


def own_share(ports: range) -> range:
    """This test process's share of `ports`: all of it outside pytest-xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or "1")
    if not worker.startswith("gw") or count <= 1:
        return ports
    index = int(worker[2:]) % count
    size = len(ports) // count
    start = ports.start + index * size
    return range(start, start + size)


def free_port(avoid: Collection[int] = ()) -> int:
    """A port on 127.0.0.1 that nothing listens on now, from this process's share, and none of
    `avoid` (ports another process was told to take but may not have bound yet)."""
    share = own_share(LISTEN_RANGE)
    if len(_given) >= len(share) // 2:
        _given.clear()
    for _ in range(len(share)):
        port = random.choice(share)
        if port not in _given and port not in _NEVER and port not in avoid and bindable(port):
            _given.add(port)
            return port
    raise RuntimeError(f"no free port in {share}")


def bindable(port: int) -> bool:
    """Whether `port` on 127.0.0.1 is free now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
