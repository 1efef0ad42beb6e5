"""The FastAPI application: routes, middleware, error handlers and the Redis lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import BaseRoute

from .. import __version__
from ..core.handlers import handler_params
from ..core.runtime import tune_gc
from ..core.settings import Settings, get_settings
from ..core.telemetry.logging import configure_logging
from ..core.telemetry.tracing import configure_tracing, shutdown_tracing
from . import metrics_port
from ._limits import ParamsCheck
from ._middleware import EdgeMiddleware
from .console import console_routes
from .deps import operation_id
from .drain import Drain, marker_path
from .errors import install_error_handlers
from .routes import docs, events, health, tasks
from .state import ApiKeys, ApiState

DESCRIPTION = """
Submit slow, inference-style tasks and read their results.

`POST /tasks` answers at once with a task id (202), or with the result itself (200) when an
identical request finished recently. Workers run queued tasks in the background;
`GET /tasks/{task_id}?wait=S` waits up to S seconds for the outcome.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Read before anything starts, so that a TASK_HANDLER the api cannot load stops it at once.
    params = handler_params(settings.task_handler)
    check_params = ParamsCheck(params, settings.max_task_duration) if params else None
    tracing = configure_tracing(settings, "fastapi-redis-mini-api")
    console: list[BaseRoute] = []
    if settings.console_enabled:
        settings.check_api()  # the admin key's rules, for an app made without the entry point
        assert settings.admin_api_key is not None
        admin_key = settings.admin_api_key.get_secret_value()
        console = console_routes(admin_key, ApiKeys(settings.api_keys))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with (
                ApiState.opened(settings, tracing=tracing, check_params=check_params) as state,
                metrics_port.served(state),
            ):
                app.state.api = state
                yield
        finally:
            shutdown_tracing()

    app = FastAPI(
        # Generators name their package after the title: openapi-python-client makes
        # fastapi-redis-mini-api-client of this one, not the official client's own name.
        title="fastapi-redis-mini API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # The routers' routes are served by the app's own router rather than included: an
        # included router is matched through a second, nested router on every request.
        routes=[
            *tasks.router.routes,
            *events.router.routes,
            *health.router.routes,
            *(docs.routes if settings.docs_enabled else ()),
            *console,
        ],
        # FastAPI's own pages load their assets from a CDN; routes/docs.py serves them instead.
        docs_url=None,
        redoc_url=None,
        # Spans come from opentelemetry-instrumentation-fastapi below, when tracing is on;
        # FastAPI's native telemetry would make a second set.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        generate_unique_id_function=operation_id,
    )
    install_error_handlers(app)
    app.add_middleware(
        EdgeMiddleware, max_body_bytes=settings.max_body_bytes, drain=Drain(marker_path())
    )
    if tracing:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz")
    return app


def app_from_environment() -> FastAPI:
    """The factory gunicorn and uvicorn load in each worker process."""
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level, "api")
    app = create_app(settings)
    tune_gc()
    return app
