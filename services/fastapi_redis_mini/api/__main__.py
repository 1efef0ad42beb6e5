"""`python -m fastapi_redis_mini.api`: serve the api with gunicorn and uvicorn workers.

WEB_CONCURRENCY sets the number of worker processes. Their metrics are merged through
prometheus_client's multiprocess mode, in PROMETHEUS_MULTIPROC_DIR (under /tmp by default,
the one path the api writes to).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from ..core.handlers import handler_params
from ..core.redis import exit_unless_durable_acks, record_layout_at_start
from ..core.settings import Settings, load_settings_or_exit
from ..core.telemetry.logging import configure_logging
from .drain import marker_path


class _Logger(GunicornLogger):  # type: ignore[misc]
    """Sends gunicorn's and uvicorn's own lines through the service's handler and format."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            log.handlers = list(logging.getLogger().handlers)
            log.propagate = False


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in each worker after the fork, so every process builds its own app and client.
        from .app import app_from_environment

        return app_from_environment()


def _prepare_metrics_dir(settings: Settings) -> str:
    path = Path(
        settings.prometheus_multiproc_dir
        or Path(tempfile.gettempdir()) / "fastapi-redis-mini-metrics"
    )
    # Counts left by an earlier run would be added to this one's.
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# How long an idle connection stays open (uvicorn's timeout_keep_alive, through gunicorn). A
# client must drop idle connections sooner: one it reuses just as this timer closes it fails
# with "Server disconnected without sending a response" (the client's default is 3 s).
KEEP_ALIVE_SECONDS = 5


def main() -> None:
    settings = load_settings_or_exit(api=True)
    configure_logging(settings.log_format, settings.log_level, "api")
    try:
        # Submits are checked with the handler's Params, so its module must load here too.
        handler_params(settings.task_handler)
    except LookupError as error:
        raise SystemExit(f"fastapi-redis-mini: invalid configuration: {error}") from None
    exit_unless_durable_acks(settings)
    record_layout_at_start(settings)
    if not settings.api_keys:
        logging.getLogger(__name__).warning(
            "API_KEYS is not set: anyone who reaches the port may submit and read tasks, and "
            "the per-key quotas bound all clients together; set API_KEYS outside local use"
        )
    # The worker processes read it through Settings, and prometheus_client reads it at import.
    metrics_dir = _prepare_metrics_dir(settings)
    # /tmp outlives a container restart inside the pod; a marker left by an earlier preStop
    # hook would have this process close every connection.
    marker_path().unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    # child_exit runs in the arbiter after it reaps a worker, however the worker died;
    # worker_exit runs inside the worker and is skipped by SIGKILL and the OOM killer.
    def child_exit(server: Any, worker: Any) -> None:
        from ..core.telemetry import metrics

        metrics.mark_process_dead(worker.pid, metrics_dir)

    _Gunicorn(
        {
            "bind": f"{settings.host}:{settings.port}",
            "workers": settings.web_concurrency,
            # uvicorn's worker with bounds on headers, slow clients and connections.
            "worker_class": "fastapi_redis_mini.api._server.BoundedWorker",
            "graceful_timeout": math.ceil(settings.drain_timeout),
            "timeout": 60,
            "keepalive": KEEP_ALIVE_SECONDS,
            "child_exit": child_exit,
            "accesslog": None,
            "logger_class": _Logger,
            "errorlog": "-",
            "loglevel": settings.log_level.lower(),
            "proc_name": "fastapi-redis-mini-api",
            "worker_tmp_dir": tempfile.gettempdir(),
            "control_socket_disable": True,
        }
    ).run()


if __name__ == "__main__":
    main()
