"""The locustfile run headless against the real api and worker."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import httpx
import pytest

from fastapi_redis_mini_harness.polling import holds_within

from .conftest import FAST_MIX, RunningService, run_locust

pytestmark = pytest.mark.slow

RUN_SECONDS = "8s"
# Users finish the task they are waiting on before they stop, so no task is cut off.
STOP_TIMEOUT = "20"


def stats_rows(csv_prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with Path(f"{csv_prefix}_stats.csv").open(newline="") as handle:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}


def finished(worker_url: str, status: str) -> float:
    text = httpx.get(f"{worker_url}/metrics", timeout=5).text
    match = re.search(
        rf'^fastapi_redis_mini_tasks_finished_total\{{status="{status}"\}} (\S+)$', text, re.M
    )
    return float(match.group(1)) if match else 0.0


def test_headless_run_finishes_tasks_with_no_failures(
    service: RunningService, tmp_path: Path
) -> None:
    prefix = tmp_path / "run"
    result = run_locust(
        service.url,
        ["--headless", "-u", "10", "-r", "10", "-t", RUN_SECONDS, "--stop-timeout", STOP_TIMEOUT,
         "--csv", str(prefix), "--only-summary", *FAST_MIX],
        cwd=tmp_path,
        timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    rows = stats_rows(prefix)
    submitted = rows[("POST", "POST /tasks")]
    end_to_end = rows[("TASK", "task end-to-end")]
    assert int(submitted["Request Count"]) >= 10
    assert int(end_to_end["Request Count"]) >= 5
    assert float(end_to_end["50%"]) > 0
    # Half the prompts come from a pool of 20, so repeats are answered from the cache.
    assert int(rows[("TASK", "task end-to-end (cache hit)")]["Request Count"]) > 0
    assert {name: row["Failure Count"] for name, row in rows.items()} == {
        name: "0" for name in rows
    }
    # The worker counts a task just after storing it DONE, so a user may see DONE first. A
    # coalesced submit shares a run with the task it joined: only the others count runs.
    seen_done = int(end_to_end["Request Count"])
    assert holds_within(lambda: finished(service.worker.base_url, "DONE") >= seen_done, 10), (
        f"the worker counted {finished(service.worker.base_url, 'DONE'):g} DONE, "
        f"users saw {seen_done}"
    )


def test_environment_variables_set_the_mix_and_failures_asked_for_are_not_locust_failures(
    service: RunningService, tmp_path: Path
) -> None:
    prefix = tmp_path / "mix"
    result = run_locust(
        service.url,
        ["--headless", "-u", "6", "-r", "6", "-t", "6s", "--stop-timeout", STOP_TIMEOUT,
         "--csv", str(prefix), "--only-summary", *FAST_MIX],
        cwd=tmp_path,
        timeout=120,
        LOCUST_UNIQUE_SHARE="1",
        LOCUST_FAILURE_SHARE="0.5",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    rows = stats_rows(prefix)
    # Every prompt unique: nothing can come from the result cache.
    assert ("TASK", "task end-to-end (cache hit)") not in rows
    assert rows[("TASK", "task end-to-end")]["Failure Count"] == "0"
    # About half the tasks were asked to fail, and did, on the worker.
    assert finished(service.worker.base_url, "FAILED") >= 2
    assert finished(service.worker.base_url, "DONE") >= 2


def test_a_stream_share_follows_tasks_through_their_events_and_times_the_first_output(
    service: RunningService, tmp_path: Path
) -> None:
    prefix = tmp_path / "streams"
    result = run_locust(
        service.url,
        ["--headless", "-u", "6", "-r", "6", "-t", "6s", "--stop-timeout", STOP_TIMEOUT,
         "--csv", str(prefix), "--only-summary", *FAST_MIX, "--stream-share", "1",
         "--unique-share", "1", "--duration-dist", "fixed", "--duration-mean", "0.3"],
        cwd=tmp_path,
        timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    rows = stats_rows(prefix)
    streams = rows[("GET", "GET /tasks/{id}/events")]
    first_output = rows[("TASK", "task first output")]
    assert int(streams["Request Count"]) >= 3
    assert int(first_output["Request Count"]) >= 3
    assert ("GET", "GET /tasks/{id}?wait") not in rows  # every task was streamed
    assert {name: row["Failure Count"] for name, row in rows.items()} == {
        name: "0" for name in rows
    }
