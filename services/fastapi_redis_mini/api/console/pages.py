"""The console's routes: pages that read, and actions (POST forms) that change, the queue.

Every page admits its request first (_auth.py), and every action of a browser session checks
its CSRF token. Errors render as a page with their status: no traceback, and a bad value is
named by its field.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ...core.models import TaskStatus, is_task_id
from ...core.queue import CancelOutcome, QueueUnavailable
from ...core.redis.console import ConsoleStore, RetryOutcome
from ..errors import UNAVAILABLE, InvalidFieldError, ServiceError, TaskNotFoundError
from ..state import ApiKeys, api_state
from ._auth import COOKIE, CSRF_FIELD, SESSION_SECONDS, Access, ConsoleAuth
from ._render import HEADERS, page, root_path

log = logging.getLogger(__name__)

_SCOPE = re.compile(r"^[0-9a-f]{16}$")
_LIMITS = (20, 50, 100, 200)
# The form fields an action reads; its body is bounded by MAX_BODY_BYTES.
_MAX_ENTRIES_PER_ACTION = 1000

Endpoint = Callable[[Request, Access, ConsoleStore], Awaitable[Response]]


class ConsoleNotFoundError(ServiceError):
    status_code, code = 404, "not_found"


def _store(request: Request) -> ConsoleStore:
    store = api_state(request).console
    assert store is not None, "the console's routes exist only with CONSOLE_ENABLED"
    return store


class ConsoleUnavailableError(ServiceError):
    """Redis cannot serve the page now; `code` names its state as the api's 503s do."""

    status_code = 503

    def __init__(self, error: QueueUnavailable) -> None:
        super().__init__(
            f"the task store cannot serve requests now ({error.state.value}); retry shortly"
        )
        self.code = UNAVAILABLE[error.state][0]


def _error_page(request: Request, error: ServiceError, *, signing_in: bool = False) -> Response:
    """The page an error answers with: the sign-in form for 401 (and for a tenant's key at
    sign-in), else the error's status, code and message."""
    if error.status_code == 401 or (signing_in and error.status_code == 403):
        return page(request, "login.html", error.status_code, message=error.message)
    return page(request, "error.html", error.status_code, error=error)


async def _form(request: Request) -> dict[str, list[str]]:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise InvalidFieldError("content-type", "must be application/x-www-form-urlencoded")
    body = (await request.body()).decode("utf-8", errors="replace")
    return parse_qs(body, keep_blank_values=True, max_num_fields=_MAX_ENTRIES_PER_ACTION + 8)


def _first(form: dict[str, list[str]], name: str) -> str:
    return form.get(name, [""])[0]


def _redirect(request: Request, path: str, notice: str = "", **counts: int) -> RedirectResponse:
    """303 to a console page; `notice` is a code of _render.NOTICES, with its counts."""
    target = f"{root_path(request)}/console{path}"
    if notice:
        target += "?" + urlencode({"notice": notice, **counts})
    return RedirectResponse(target, status_code=303, headers=HEADERS)


class ConsolePages:
    def __init__(self, auth: ConsoleAuth) -> None:
        self.auth = auth

    def _guarded(
        self, endpoint: Endpoint, *, action: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(endpoint)
        async def handle(request: Request) -> Response:
            try:
                access = self.auth.admit(request)
                if action:
                    try:
                        form = await _form(request)
                    except InvalidFieldError:
                        self.auth.check_csrf(access, "")  # a session's action: 403 first
                        raise
                    self.auth.check_csrf(access, _first(form, CSRF_FIELD))
                    request.state.form = form
                return await endpoint(request, access, _store(request))
            except ServiceError as error:
                return _error_page(request, error)
            except QueueUnavailable as error:
                log.warning("redis cannot serve the console: %s", error)
                return _error_page(request, ConsoleUnavailableError(error))

        return handle

    # -- signing in

    async def login_form(self, request: Request) -> Response:
        return page(request, "login.html")

    async def login(self, request: Request) -> Response:
        try:
            form = await _form(request)
            self.auth.check_key(_first(form, "key").strip())
        except ServiceError as error:
            return _error_page(request, error, signing_in=True)
        response = _redirect(request, "")
        response.set_cookie(
            COOKIE,
            self.auth.new_session(),
            max_age=SESSION_SECONDS,
            path=f"{root_path(request)}/console",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        response = _redirect(request, "/login")
        response.delete_cookie(COOKIE, path=f"{root_path(request)}/console")
        return response

    # -- pages

    async def overview(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        overview = await store.overview()
        # Lanes are shown while PRIORITY_LANES is on, or while tasks still wait in them.
        lanes = store.queue.settings.priority_lanes or any(
            lane.depth for lane in overview.stats.lanes
        )
        return page(request, "overview.html", access=access, overview=overview, lanes=lanes,
                    section="overview")  # fmt: skip

    async def overview_json(
        self, request: Request, access: Access, store: ConsoleStore
    ) -> Response:
        """The overview's figures, which the page's charts poll; also for scripts."""
        overview = await store.overview()
        stats = overview.stats
        partitions = stats.partitions or (stats,)
        return JSONResponse(
            {
                "now": overview.now,
                "partitions": [
                    {
                        "partition": p.partition or 0,
                        "depth": p.stream_length,
                        "lag": p.lag,
                        "pending": p.pending,
                        "oldest_age": max(p.oldest_undelivered_age, p.oldest_pending_age),
                        "dead_letters": p.dead_letter_length,
                        "retries": p.retry_size,
                        "workers": p.consumers,
                        "lanes": [
                            {"priority": lane.priority, "depth": lane.depth,
                             "oldest_age": lane.oldest_age}
                            for lane in p.lanes
                        ],
                    }
                    for p in partitions
                ],
                "counts": [
                    {"start": c.start, "done": c.done, "failed": c.failed,
                     "cancelled": c.cancelled}
                    for c in overview.counts
                ],
            },
            headers=HEADERS,
        )  # fmt: skip

    async def tasks(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        query = request.query_params
        task_id = query.get("task_id", "").strip()
        if task_id:
            if not is_task_id(task_id):
                raise InvalidFieldError("task_id", "is not a task id (32 hex digits)")
            return _redirect(request, f"/tasks/{task_id}")
        status = query.get("status", "").upper() or None
        if status is not None and status not in TaskStatus.__members__:
            raise InvalidFieldError("status", "must be one of " + ", ".join(TaskStatus.__members__))
        scope = query.get("scope", "").strip().lower() or None
        if scope is not None and not _SCOPE.fullmatch(scope):
            raise InvalidFieldError("scope", "must be an API key's scope (16 hex digits)")
        limit_text = query.get("limit", "50")
        if not limit_text.isdigit() or int(limit_text) not in _LIMITS:
            raise InvalidFieldError("limit", "must be one of " + ", ".join(map(str, _LIMITS)))
        records = await store.recent(status=status, scope=scope, limit=int(limit_text))
        return page(request, "tasks.html", access=access, tasks=records, status=status or "",
                    scope=scope or "", limit=int(limit_text), statuses=list(TaskStatus),
                    limits=_LIMITS, section="tasks")  # fmt: skip

    async def task(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        task_id = request.path_params["task_id"]
        record = await store.task(task_id) if is_task_id(task_id) else None
        if record is None:
            raise ConsoleNotFoundError(f"no task {task_id}: it never existed or it expired")
        events = await store.events(task_id)
        return page(request, "task.html", access=access, task=record, events=events,
                    section="tasks")  # fmt: skip

    async def dead_letters(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        letters = await store.dead_letters(limit=100)
        return page(request, "dead_letters.html", access=access, letters=letters,
                    section="dead-letters")  # fmt: skip

    async def dead_letter(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        entry_id = request.query_params.get("id", "")
        letter = await store.dead_letter(entry_id)
        if letter is None:
            raise ConsoleNotFoundError(f"no dead letter {entry_id}")
        record = await store.task(letter.task_id) if letter.task_id else None
        return page(request, "dead_letter.html", access=access, letter=letter, task=record,
                    section="dead-letters")  # fmt: skip

    async def workers(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        return page(request, "workers.html", access=access, workers=await store.workers(),
                    section="workers")  # fmt: skip

    async def scheduled(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        return page(request, "scheduled.html", access=access,
                    scheduled=await store.scheduled(limit=100), section="scheduled")  # fmt: skip

    # -- actions

    async def cancel(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        task_id = request.path_params["task_id"]
        outcome = await store.cancel(task_id) if is_task_id(task_id) else CancelOutcome.NOT_FOUND
        if outcome is CancelOutcome.NOT_FOUND:
            raise TaskNotFoundError()
        notice = {
            CancelOutcome.CANCELLED: "cancelled",
            CancelOutcome.REQUESTED: "cancel-requested",
            CancelOutcome.FINAL: "already-ended",
        }[outcome]
        return _redirect(request, f"/tasks/{task_id}", notice)

    async def retry(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        task_id = request.path_params["task_id"]
        outcome = await store.retry(task_id) if is_task_id(task_id) else RetryOutcome.NOT_FOUND
        if outcome is RetryOutcome.NOT_FOUND:
            raise TaskNotFoundError()
        notice = "retried" if outcome is RetryOutcome.QUEUED else "not-retried"
        return _redirect(request, f"/tasks/{task_id}", notice)

    async def _chosen_letters(self, request: Request, store: ConsoleStore) -> list[str]:
        form: dict[str, list[str]] = request.state.form
        if _first(form, "all") == "1":
            letters = await store.dead_letters(limit=_MAX_ENTRIES_PER_ACTION)
            return [letter.entry_id for letter in letters]
        chosen = form.get("entry_id", [])
        if not chosen:
            raise InvalidFieldError("entry_id", "name at least one dead letter, or send all=1")
        return chosen[:_MAX_ENTRIES_PER_ACTION]

    async def replay(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        chosen = await self._chosen_letters(request, store)
        replayed = await store.replay(chosen)
        return _redirect(request, "/dead-letters", "replayed", n=replayed, of=len(chosen))

    async def delete(self, request: Request, access: Access, store: ConsoleStore) -> Response:
        chosen = await self._chosen_letters(request, store)
        deleted = await store.delete_dead_letters(chosen)
        return _redirect(request, "/dead-letters", "deleted", n=deleted, of=len(chosen))

    def routes(self) -> list[BaseRoute]:
        read, act = self._guarded, functools.partial(self._guarded, action=True)
        return [
            Route("/console", read(self.overview), name="console_overview"),
            Route("/console/overview.json", read(self.overview_json)),
            Route("/console/login", self.login_form, methods=["GET"]),
            Route("/console/login", self.login, methods=["POST"]),
            Route("/console/logout", act(self.logout), methods=["POST"]),
            Route("/console/tasks", read(self.tasks)),
            Route("/console/tasks/{task_id}", read(self.task)),
            Route("/console/tasks/{task_id}/cancel", act(self.cancel), methods=["POST"]),
            Route("/console/tasks/{task_id}/retry", act(self.retry), methods=["POST"]),
            Route("/console/dead-letters", read(self.dead_letters)),
            Route("/console/dead-letter", read(self.dead_letter)),
            Route("/console/dead-letters/replay", act(self.replay), methods=["POST"]),
            Route("/console/dead-letters/delete", act(self.delete), methods=["POST"]),
            Route("/console/workers", read(self.workers)),
            Route("/console/scheduled", read(self.scheduled)),
            # EdgeMiddleware leaves static files uncounted: a file name is no route.
            Mount(
                "/console/static",
                StaticFiles(packages=[("fastapi_redis_mini.api.console", "static")]),
            ),
        ]


def console_routes(admin_key: str, api_keys: ApiKeys) -> list[BaseRoute]:
    """The console's routes, admitting `admin_key` and refusing the tenants' `api_keys`."""
    return ConsolePages(ConsoleAuth(admin_key, api_keys)).routes()
