"""Rendering the console's pages: packaged Jinja2 templates, escaped by default, and the
headers every page carries (a strict CSP: scripts, styles and requests of this origin only)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# What an action's redirect may ask the next page to say, by code: a link cannot make the
# console show text of its own choosing. {n} and {of} are counts from the query.
NOTICES = {
    "cancelled": "cancelled",
    "cancel-requested": "cancel requested: its worker stops it",
    "already-ended": "not cancelled: the task had already ended",
    "retried": "queued again",
    "not-retried": "not retried: only a FAILED or CANCELLED task is",
    "replayed": "replayed {n} of {of}",
    "deleted": "deleted {n} of {of}",
}
# A result or request longer than this is cut on the page: one task cannot make it huge.
SHOWN_CHARS = 20_000


def _when(timestamp: str | float | None) -> str:
    try:
        value = float(timestamp or 0)
    except ValueError:
        return ""
    if not value:
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _ago(timestamp: str | float | None) -> str:
    try:
        value = float(timestamp or 0)
    except ValueError:
        return ""
    return _seconds(time.time() - value) + " ago" if value else ""


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _pretty(text: str | None) -> str:
    """JSON text indented, or the text as it is when it is not JSON; cut at SHOWN_CHARS."""
    if not text:
        return ""
    try:
        shown = orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        shown = text
    if len(shown) > SHOWN_CHARS:
        return shown[:SHOWN_CHARS] + f"\n... ({len(shown) - SHOWN_CHARS} more characters)"
    return shown


_env = Environment(
    loader=PackageLoader("fastapi_redis_mini.api.console", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(when=_when, ago=_ago, seconds=_seconds, pretty=_pretty)


def _notice(request: Request) -> str:
    query = request.query_params
    template = NOTICES.get(query.get("notice", ""), "")
    counts = {name: query.get(name, "0") for name in ("n", "of")}
    if not all(value.isdigit() and len(value) < 10 for value in counts.values()):
        return ""
    return template.format(**counts)


def root_path(request: Request) -> str:
    """Where a proxy serves the api; every link of the console starts with it."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(template).render(
        root=root_path(request),
        notice=_notice(request),
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=HEADERS)
