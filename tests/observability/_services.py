"""Waiting for the shared service helpers' processes, with room for a busy machine."""

from __future__ import annotations

from fastapi_redis_mini_harness.processes import Process

# gunicorn boots several processes that each import the app; on a loaded 2-core machine
# that can take longer than the shared helpers' default wait.
START_TIMEOUT = 60.0


def ready(service: Process, path: str) -> Process:
    """Wait until `path` answers 200; stop the process if it never does."""
    try:
        service.wait_until_answers(path, timeout=START_TIMEOUT)
    except BaseException:
        service.close()
        raise
    return service
