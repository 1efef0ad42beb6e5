"""HTTP clients for tests that send from several threads at once.

httpx's connection pool is not safe to share between threads: it can hand an idle connection
to one thread and, before that thread has marked it busy, let another close it as expired or
disconnected. The first thread then reads from a closed socket ("[Errno 9] Bad file
descriptor"), an error of the test's client that no server caused. Each thread gets a
client of its own here instead, made like the test's client.

The clients share one TLS context (`fastapi_redis_mini_harness.http`): twenty threads each
building their own would spread a burst that a test meant to arrive together over most of a
second.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import httpx

from fastapi_redis_mini_harness.http import tls_context


@contextlib.contextmanager
def client_per_thread(like: httpx.Client) -> Iterator[Callable[[], httpx.Client]]:
    """A function that returns the calling thread's own client (the same base URL, headers
    and timeout as `like`, and the default certificate checks); every client made is closed
    on leaving. Leave it only after the threads that use it are done (shut their executor
    down first)."""
    context = tls_context()
    local = threading.local()
    made: list[httpx.Client] = []
    lock = threading.Lock()

    def own() -> httpx.Client:
        client: httpx.Client | None = getattr(local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=like.base_url, headers=like.headers, timeout=like.timeout, verify=context
            )
            local.client = client
            with lock:
                made.append(client)
        return client

    try:
        yield own
    finally:
        for client in made:
            client.close()
