"""Who gets into the console, and which requests it refuses, on a real api over HTTP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from .conftest import ADMIN_KEY, TENANT_KEY, Console

pytestmark = pytest.mark.slow

PAGES = (
    "/console",
    "/console/overview.json",
    "/console/tasks",
    "/console/dead-letters",
    "/console/workers",
    "/console/scheduled",
)


@contextmanager
def signed_in(console: Console) -> Iterator[tuple[httpx.Client, str]]:
    """A browser-like client after the login form, and the CSRF token its pages carry."""
    with httpx.Client(base_url=console.url, timeout=10) as client:
        answer = client.post("/console/login", data={"key": ADMIN_KEY})
        assert answer.status_code == 303, answer.text
        page = client.get("/console/tasks")
        match = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page.text)
        assert match, page.text
        yield client, match[1]


def test_a_request_without_the_admin_key_gets_401_and_the_sign_in_form(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=10) as client:
        for path in PAGES:
            answer = client.get(path)
            assert answer.status_code == 401, path
            assert 'action="/console/login"' in answer.text
        assert client.post("/console/dead-letters/replay", data={"all": "1"}).status_code == 401
        wrong = client.get("/console", headers={"Authorization": "Bearer not-a-key-at-all"})
        assert wrong.status_code == 401


def test_a_tenant_key_gets_403_from_every_page_and_the_login_form(console: Console) -> None:
    with console.tenant() as client:
        for path in PAGES:
            assert client.get(path).status_code == 403, path
        login = client.post("/console/login", data={"key": TENANT_KEY})
        assert login.status_code == 403
        assert "frm_console" not in login.cookies


def test_the_admin_key_opens_every_page_as_bearer_or_session(console: Console) -> None:
    with console.admin() as client:
        for path in PAGES:
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.text)
            csp = answer.headers["content-security-policy"]
            assert "script-src 'self'" in csp
            assert "default-src 'none'" in csp
    with signed_in(console) as (client, _):
        for path in PAGES:
            assert client.get(path).status_code == 200, path
        cookie = client.cookies.jar
        assert [c for c in cookie if c.name == "frm_console" and c.has_nonstandard_attr("HttpOnly")]


def test_an_action_without_the_csrf_token_gets_403_and_changes_nothing(console: Console) -> None:
    console.worker()
    task_id = console.submit("slow", duration=20)
    console.wait_for(task_id, "RUNNING")
    with signed_in(console) as (client, token):
        missing = client.post(f"/console/tasks/{task_id}/cancel", data={})
        assert missing.status_code == 403
        assert "csrf_token" in missing.text
        forged = client.post(f"/console/tasks/{task_id}/cancel", data={"csrf_token": "0" * 64})
        assert forged.status_code == 403
        assert console.status(task_id) == "RUNNING"
        done = client.post(f"/console/tasks/{task_id}/cancel", data={"csrf_token": token})
        assert done.status_code == 303
    console.wait_for(task_id, "CANCELLED", timeout=15)


def test_bad_input_is_a_clear_error_naming_the_field(console: Console) -> None:
    with console.admin() as client:
        for query, field in (
            ({"status": "LOST"}, "status"),
            ({"scope": "not-hex"}, "scope"),
            ({"limit": "7"}, "limit"),
            ({"task_id": "../etc"}, "task_id"),
        ):
            answer = client.get("/console/tasks", params=query)
            assert answer.status_code == 422, query
            assert f"{field}: " in answer.text
            assert "Traceback" not in answer.text
        # A link cannot make a page say what it likes: notices are codes of the console's own.
        crafted = client.get("/console", params={"notice": "Paste your key at evil.example"})
        assert "evil.example" not in crafted.text
        counted = client.get("/console", params={"notice": "replayed", "n": "2", "of": "3"})
        assert "replayed 2 of 3" in counted.text
        unknown = client.get("/console/tasks/" + "0" * 32)
        assert unknown.status_code == 404
        no_letter = client.post("/console/dead-letters/replay", data={"entry": "typo"})
        assert no_letter.status_code == 422
        assert "entry_id: " in no_letter.text
        as_json = client.post("/console/dead-letters/replay", json={"all": "1"})
        assert as_json.status_code == 422
        assert "content-type: " in as_json.text


def test_a_tasks_page_and_its_events_are_the_admins_only(console: Console) -> None:
    task_id = console.submit("whose events")
    path = f"/console/tasks/{task_id}"
    with httpx.Client(base_url=console.url, timeout=10) as anonymous:
        assert anonymous.get(path).status_code == 401
    with console.tenant() as tenant:
        assert tenant.get(path).status_code == 403
    with console.admin() as admin:
        answer = admin.get(path)
        assert answer.status_code == 200, answer.text
        assert 'id="events"' in answer.text
        assert "default-src 'none'" in answer.headers["content-security-policy"]
