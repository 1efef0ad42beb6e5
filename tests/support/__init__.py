"""What only the tests need: task handlers, faults, containers, tools, the browser.

Starting Redis and the services, and waiting, is the harness's (`fastapi_redis_mini_harness`).
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
