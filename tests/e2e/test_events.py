"""GET /tasks/{id}/events against a real api, worker and Redis: what a client of the stream sees."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import orjson
import pytest
from playwright.sync_api import sync_playwright

from ..support.browser import CHROMIUM_FLAGS, require_chromium
from .conftest import Start

pytestmark = pytest.mark.slow

WORDS = "one two three four five six seven eight"


@dataclass
class Event:
    id: str
    kind: str
    data: dict[str, object]


def read_events(
    client: httpx.Client, task_id: str, last_event_id: str | None = None, stop_after: int = 0
) -> tuple[int, list[Event], list[str]]:
    """The status code, the events, and the comment lines of one connection to the stream."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[Event] = []
    comments: list[str] = []
    with client.stream("GET", f"/tasks/{task_id}/events", headers=headers) as answer:
        if answer.status_code != 200:
            answer.read()
            return answer.status_code, [], []
        assert answer.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in answer.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "event" in fields:
                events.append(Event(fields["id"], fields["event"], orjson.loads(fields["data"])))
                fields = {}
                if stop_after and len(events) == stop_after:
                    break
            else:
                fields = {}
    return 200, events, comments


def output_of(events: list[Event]) -> str:
    return "".join(str(e.data["chunk"]) for e in events if e.kind == "output")


def test_a_stream_shows_status_progress_and_output_then_ends_with_done(
    api: Start, worker: Start
) -> None:
    server = api()
    worker()
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        body = {"prompt": WORDS, "params": {"duration": 1.0}}
        task_id = client.post("/tasks", json=body).json()["task_id"]
        code, events, _ = read_events(client, task_id)
        assert code == 200
        kinds = [e.kind for e in events]
        assert kinds[0] == "status"
        assert "RUNNING" in [e.data["status"] for e in events if e.kind == "status"]
        assert kinds[-1] == "done"
        assert kinds.count("done") == 1
        final = events[-1].data
        assert final["status"] == "DONE"
        # The chunks, joined, are the result's output: nothing lost, nothing repeated.
        assert output_of(events) == final["result"]["output"]  # type: ignore[index]
        fractions = [float(e.data["fraction"]) for e in events if e.kind == "progress"]  # type: ignore[arg-type]
        assert fractions == sorted(fractions)
        assert fractions[-1] == 1.0
        assert len({e.id for e in events}) == len(events)
        # GET shows the latest progress too.
        task = client.get(f"/tasks/{task_id}").json()
        assert task["progress"] == 1.0
        assert task["progress_message"].endswith("words")


def test_resuming_with_last_event_id_loses_and_repeats_nothing(api: Start, worker: Start) -> None:
    server = api()
    worker()
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        body = {"prompt": WORDS, "params": {"duration": 1.5}}
        task_id = client.post("/tasks", json=body).json()["task_id"]
        _, first, _ = read_events(client, task_id, stop_after=5)
        assert first[-1].kind in ("progress", "output")  # cut in the middle of the run
        _, rest, _ = read_events(client, task_id, last_event_id=first[-1].id)
        events = first + rest
        assert rest[-1].kind == "done"
        assert output_of(events) == rest[-1].data["result"]["output"]  # type: ignore[index]
        assert len({e.id for e in events}) == len(events)
        assert [e.kind for e in rest].count("status") <= 1  # only a status that changed

        # Past the final event there is nothing more: 204 tells an EventSource to stop.
        code, _, _ = read_events(client, task_id, last_event_id=rest[-1].id)
        assert code == 204


def test_failed_and_cancelled_tasks_end_their_streams(api: Start, worker: Start) -> None:
    server = api()
    # A worker asks whether its tasks were cancelled every CLAIM_IDLE/3: 1 s here, not the
    # default's 10 s, which alone could use up the bound below on a loaded machine.
    worker(CLAIM_IDLE="3")
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        failing = client.post("/tasks", json={"prompt": "x", "params": {"fail": True}})
        _, events, _ = read_events(client, failing.json()["task_id"])
        assert events[-1].kind == "failed"
        assert "simulated failure" in str(events[-1].data["error"])

        slow = client.post("/tasks", json={"prompt": WORDS, "params": {"duration": 20}})
        task_id = slow.json()["task_id"]
        threading.Timer(0.8, lambda: httpx.delete(f"{server.base_url}/tasks/{task_id}")).start()
        started = time.monotonic()
        _, events, _ = read_events(client, task_id)
        assert events[-1].kind == "cancelled"
        # Well before the 20 s run would have ended on its own.
        assert time.monotonic() - started < 10


def test_unknown_ids_and_bad_event_ids_are_refused_before_the_stream(
    api: Start, worker: Start
) -> None:
    server = api()
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        missing = client.get(f"/tasks/{'0' * 32}/events")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "task_not_found"
        task_id = client.post("/tasks", json={"prompt": "p"}).json()["task_id"]
        bad = client.get(f"/tasks/{task_id}/events", headers={"Last-Event-ID": "nonsense"})
        assert bad.status_code == 422
        assert bad.json()["error"]["message"].startswith("Last-Event-ID")
        assert "Traceback" not in bad.text


def test_an_idle_stream_gets_keep_alives_and_a_key_over_its_cap_gets_429(
    api: Start, worker: Start
) -> None:
    server = api(
        EVENTS_HEARTBEAT="0.3",
        EVENTS_MAX_STREAMS_PER_KEY="2",
        WEB_CONCURRENCY="1",
        API_KEYS="k1,k2",
    )
    headers = {"Authorization": "Bearer k1"}
    with httpx.Client(base_url=server.base_url, timeout=10, headers=headers) as client:
        # No worker: the task stays PENDING, and its stream idle.
        task_id = client.post("/tasks", json={"prompt": "waits"}).json()["task_id"]
        with (
            client.stream("GET", f"/tasks/{task_id}/events") as one,
            client.stream("GET", f"/tasks/{task_id}/events") as two,
        ):
            assert (one.status_code, two.status_code) == (200, 200)
            lines = one.iter_lines()
            seen: list[str] = []
            while ": keep-alive" not in seen:
                seen.append(next(lines))
            third = client.get(f"/tasks/{task_id}/events")
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "too_many_streams"
            other = client.get(f"/tasks/{task_id}/events", headers={"Authorization": "Bearer k2"})
            assert other.status_code == 404  # another key's tenant does not see the task
        # Closed streams free their places.
        deadline = time.monotonic() + 5
        while True:
            with client.stream("GET", f"/tasks/{task_id}/events") as again:
                if again.status_code == 200 or time.monotonic() > deadline:
                    assert again.status_code == 200
                    break
            time.sleep(0.1)


def test_a_browser_eventsource_reads_the_stream_to_its_end(api: Start, worker: Start) -> None:
    chromium = require_chromium()
    server = api()
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        body = {"prompt": WORDS, "params": {"duration": 0.8}}
        task_id = client.post("/tasks", json=body).json()["task_id"]
    follow = """(path) => {
        window.seen = [];
        const source = new EventSource(path);
        const keep = (kind) => (e) => {
            window.seen.push([kind, e.lastEventId, JSON.parse(e.data)]);
            if (kind === "done") source.close();
        };
        for (const kind of ["status", "progress", "output", "done"]) {
            source.addEventListener(kind, keep(kind));
        }
    }"""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{server.base_url}/healthz")  # same origin as the stream
            page.evaluate(follow, f"/tasks/{task_id}/events")
            page.wait_for_function("window.seen.length > 0")  # PENDING, before any worker
            worker()
            page.wait_for_function("window.seen.some((e) => e[0] === 'done')", timeout=20_000)
            seen = page.evaluate("window.seen")
        finally:
            browser.close()
    kinds = [kind for kind, _, _ in seen]
    assert kinds[:2] == ["status", "status"]  # PENDING, then RUNNING
    assert kinds[-1] == "done"
    output = "".join(data["chunk"] for kind, _, data in seen if kind == "output")
    assert output == seen[-1][2]["result"]["output"]
    assert len({event_id for _, event_id, _ in seen}) == len(seen)


def test_a_stream_cut_on_one_api_resumes_on_another(api: Start, worker: Start) -> None:
    first_api, second_api = api(), api()
    worker()
    with (
        httpx.Client(base_url=first_api.base_url, timeout=10) as one,
        httpx.Client(base_url=second_api.base_url, timeout=10) as other,
    ):
        body = {"prompt": WORDS, "params": {"duration": 1.5}}
        task_id = one.post("/tasks", json=body).json()["task_id"]
        _, before, _ = read_events(one, task_id, stop_after=6)
        assert first_api.stop() == 0  # that replica is gone
        _, after, _ = read_events(other, task_id, last_event_id=before[-1].id)
    events = before + after
    assert events[-1].kind == "done"
    assert output_of(events) == events[-1].data["result"]["output"]  # type: ignore[index]
    assert len({e.id for e in events}) == len(events)


def test_without_api_keys_the_stream_cap_bounds_all_clients_together(api: Start) -> None:
    server = api(EVENTS_MAX_STREAMS_PER_KEY="1", WEB_CONCURRENCY="1")
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        task_id = client.post("/tasks", json={"prompt": "no keys"}).json()["task_id"]
        with (
            client.stream("GET", f"/tasks/{task_id}/events") as one,
            client.stream("GET", f"/tasks/{task_id}/events") as two,
        ):
            assert (one.status_code, two.status_code) == (200, 429)
            two.read()
            assert two.json()["error"]["code"] == "too_many_streams"
