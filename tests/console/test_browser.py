"""The console in Debian's chromium, against a real api, real workers and a real Redis.

Each page is opened as an operator would, after signing in with the admin key; the pages'
screenshots land in docs/console/, where the README and docs/console.md show them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from ..support import REPO_ROOT
from ..support.browser import CHROMIUM_FLAGS, require_chromium
from .conftest import ADMIN_KEY, Console

pytestmark = pytest.mark.slow

SCREENSHOTS = REPO_ROOT / "docs" / "console"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require_chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, console: Console) -> Iterator[Page]:
    """A signed-in page; any script error or CSP violation on it fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    opened.goto(f"{console.url}/console")  # 401: the sign-in form
    expect(opened.get_by_role("heading", name="Sign in")).to_be_visible()
    opened.fill("#key", ADMIN_KEY)
    opened.get_by_role("button", name="Sign in").click()
    expect(opened.get_by_role("heading", name="Overview")).to_be_visible()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    opened.on(
        "console",
        lambda message: problems.append(message.text) if message.type == "error" else None,
    )
    yield opened
    context.close()
    assert problems == [], problems


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def task_page(page: Page, console: Console, task_id: str) -> None:
    page.goto(f"{console.url}/console")
    page.fill("input[name=task_id]", task_id)
    page.get_by_role("button", name="Find").click()
    expect(page.get_by_role("heading", name=f"Task {task_id}")).to_be_visible()


def test_every_page_opens_and_shows_the_queue_as_it_is(page: Page, console: Console) -> None:
    console.worker(RETRY_BACKOFF="60", RETRY_BACKOFF_MAX="60")
    done = [console.submit(f"done {n}") for n in range(5)]
    failed = console.submit("fails", fail=True)
    waiting = console.submit("retries later", fail=True, retryable=True)
    for task_id in done:
        console.wait_for(task_id, "DONE")
    console.wait_for(failed, "FAILED")
    running = console.submit("held by the worker", duration=20)
    console.wait_for(running, "RUNNING")

    page.goto(f"{console.url}/console")
    # The live chart fills from overview.json: five done in the last bucket(s).
    expect(page.locator("#chart-done rect")).to_have_count(30)
    expect(page.locator("#partitions [data-field=workers]")).to_have_text("1")
    shoot(page, "overview")

    page.get_by_role("link", name="Tasks", exact=True).click()
    expect(page.locator("#tasks tbody tr")).to_have_count(8)
    shoot(page, "tasks")

    page.get_by_role("link", name="Workers").click()
    workers = page.locator("#workers tbody tr")
    expect(workers).to_have_count(1)
    expect(workers.locator("td").nth(3)).to_have_text("1")  # entries held
    expect(workers.locator("td").nth(4)).to_have_text(running)  # the task in flight
    shoot(page, "workers")

    page.get_by_role("link", name="Scheduled").click()
    expect(page.locator("#scheduled tbody tr").first).to_contain_text(waiting, timeout=15_000)
    shoot(page, "scheduled")

    task_page(page, console, done[0])
    expect(page.locator("#task-result")).to_contain_text("0 done")
    shoot(page, "task")

    page.get_by_role("link", name="Dead letters").click()
    expect(page.locator("#dead-letters")).to_contain_text("No dead letters.")


def test_a_failed_task_is_found_by_status_and_scope_and_retried(
    page: Page, console: Console
) -> None:
    console.worker()
    ok = console.submit("fine")
    failed = console.submit("broken", fail=True)
    console.wait_for(ok, "DONE")
    console.wait_for(failed, "FAILED")

    page.goto(f"{console.url}/console/tasks")
    page.select_option("select[name=status]", "FAILED")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(failed)
    expect(rows.first).to_contain_text("simulated failure requested by params.fail")
    # The scope link filters by the tenant that submitted it: both of its tasks.
    rows.first.locator("td").nth(2).get_by_role("link").click()
    expect(page.locator("#tasks tbody tr")).to_have_count(2)

    page.get_by_role("link", name=failed).click()
    expect(page.locator("#task-error")).to_contain_text("simulated failure")
    page.get_by_role("button", name="Retry").click()
    expect(page.get_by_role("status")).to_have_text("queued again")
    # It runs again, and fails again: the last error is kept beside the new one.
    console.wait_for(failed, "FAILED")
    page.reload()
    expect(page.get_by_text("Error before the last retry")).to_be_visible()
    expect(page.locator(".fields")).to_contain_text("attempts1")


def test_a_dead_letter_replayed_from_the_console_finishes(page: Page, console: Console) -> None:
    # The first worker dies on the prompt "poison", holding its entry; the second one claims
    # it, finds it delivered MAX_DELIVERIES times and dead-letters it. Replayed, the second
    # (which runs the plain handler) finishes it.
    doomed = console.worker(TASK_HANDLER="tests.support.handlers:poison", MAX_DELIVERIES="1")
    task_id = console.submit("poison")
    doomed.process.wait(30)
    console.worker(MAX_DELIVERIES="1")
    console.wait_for(task_id, "FAILED")

    page.goto(f"{console.url}/console/dead-letters")
    row = page.locator("#dead-letters tbody tr").filter(has_text=task_id)
    expect(row).to_have_count(1)
    row.locator("td").first.get_by_role("link").click()
    expect(page.locator(".fields")).to_contain_text(task_id)
    shoot(page, "dead-letter")
    page.get_by_role("link", name="Dead letters").click()
    shoot(page, "dead-letters")

    row.get_by_role("button", name="Replay").click()
    expect(page.get_by_role("status")).to_have_text("replayed 1 of 1")
    expect(page.locator("#dead-letters")).to_contain_text("No dead letters.")
    console.wait_for(task_id, "DONE")
    task_page(page, console, task_id)
    expect(page.locator("h1 .status")).to_have_text("DONE")


def test_a_running_task_is_cancelled_from_its_page(page: Page, console: Console) -> None:
    console.worker()
    task_id = console.submit("long", duration=20)
    console.wait_for(task_id, "RUNNING")

    task_page(page, console, task_id)
    expect(page.locator("h1 .status")).to_have_text("RUNNING")
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("status")).to_have_text("cancel requested: its worker stops it")
    console.wait_for(task_id, "CANCELLED", timeout=15)
    page.reload()
    expect(page.locator("h1 .status")).to_have_text("CANCELLED")
    expect(page.get_by_role("button", name="Retry")).to_be_visible()


def test_the_sign_in_page_refuses_a_wrong_key(browser: Browser, console: Console) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 600})
    try:
        response = page.goto(f"{console.url}/console/workers")
        assert response is not None
        assert response.status == 401
        page.fill("#key", "not-the-admin-key")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_have_text("this is not the admin key")
        shoot(page, "login")
    finally:
        page.close()


LANES = {"PRIORITY_LANES": "true"}
# A prompt that would run script if a page ever put it into the HTML unescaped.
MARKUP = "</pre><script>document.title='owned'</script>"


def submit_with(console: Console, body: dict[str, object]) -> str:
    with console.tenant() as client:
        answer = client.post("/tasks", json=body)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


@pytest.mark.parametrize("console", [LANES], indirect=True)
def test_lanes_and_delayed_tasks_are_shown_as_they_wait(page: Page, console: Console) -> None:
    # No worker yet: what is submitted waits in its lane, or in the schedule.
    for n in range(2):
        submit_with(console, {"prompt": f"normal {n}"})
    submit_with(console, {"prompt": "low", "priority": "low"})
    delayed = submit_with(console, {"prompt": "later", "delay_seconds": 600})

    page.goto(f"{console.url}/console")
    lanes = page.locator("#lanes tbody tr")
    expect(lanes).to_have_count(3)
    expect(page.locator('#lanes tr[data-lane="normal"] [data-field=depth]')).to_have_text("2")
    expect(page.locator('#lanes tr[data-lane="low"] [data-field=depth]')).to_have_text("1")
    expect(page.locator('#lanes tr[data-lane="high"] [data-field=depth]')).to_have_text("0")
    # The live refresh fills the ages in again: the oldest normal task has waited a while.
    expect(page.locator('#lanes tr[data-lane="normal"] [data-field=oldest_age]')).not_to_have_text(
        "0.0 s", timeout=15_000
    )
    shoot(page, "lanes")

    page.get_by_role("link", name="Scheduled").click()
    row = page.locator("#delayed tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text(delayed)
    expect(row).to_contain_text(" UTC")  # its run_at
    expect(page.locator("#scheduled")).to_contain_text("Nothing is waiting.")
    shoot(page, "delayed")

    # A worker takes the lanes' tasks: they empty, and the delayed task still waits.
    console.worker(PRIORITY_LANES="true")
    page.goto(f"{console.url}/console")
    expect(page.locator('#lanes tr[data-lane="normal"] [data-field=depth]')).to_have_text(
        "0", timeout=30_000
    )
    page.goto(f"{console.url}/console/scheduled")
    expect(page.locator("#delayed tbody tr")).to_contain_text(delayed)


def test_a_tasks_page_shows_its_event_stream(page: Page, console: Console) -> None:
    console.worker()
    task_id = console.submit(f"three words {MARKUP}", duration=1)
    console.wait_for(task_id, "DONE")

    task_page(page, console, task_id)
    events = page.locator("#events tbody tr")
    # The simulated model streams its output word by word, each word with its progress:
    # "[simulate] <digest>: <markup> words three", five words.
    expect(events.filter(has_text="output")).to_have_count(5)
    expect(events.filter(has_text="progress")).to_have_count(5)
    expect(events.last).to_contain_text("100% 5 of 5 words")
    # The prompt's markup is shown as text, never run.
    expect(page.locator("#events")).to_contain_text(MARKUP)
    assert page.title() != "owned"
    shoot(page, "task-events")

    # A task that reported nothing says so.
    quiet = console.submit("quiet")
    console.wait_for(quiet, "DONE")
    task_page(page, console, quiet)
    expect(page.locator("#events")).to_contain_text("No reports")
