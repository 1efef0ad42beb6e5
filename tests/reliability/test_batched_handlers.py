"""Batched handlers and the real model across processes: two real workers, api and Redis."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from fastapi_redis_mini_harness.polling import poll

from ._chaos import collect, metric, scrape, submit_all
from .conftest import Launcher

pytestmark = pytest.mark.slow


def test_two_batching_workers_answer_per_item_cancel_mid_batch_and_cache_each_item(
    redis_url: str, launch: Launcher
) -> None:
    api = launch.api(redis_url)
    # CLAIM_IDLE sets how often a worker asks whether its tasks were cancelled (a third of it).
    workers = launch.workers(
        redis_url,
        2,
        TASK_HANDLER="tests.support.handlers:BatchModel",
        MAX_CONCURRENCY="8",
        CLAIM_IDLE="1.5",
    )
    prompts = [f"item {n}" for n in range(10)] + ["bad one", "bad two"]
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        ids = submit_all(client, [{"prompt": p, "params": {"block": 0.5}} for p in prompts])
        [slow] = submit_all(client, [{"prompt": "cancel me", "params": {"block": 3.0}}])
        poll(
            lambda: client.get(f"/tasks/{slow}").json()["status"] == "RUNNING",
            20,
            what="the slow batch never started",
        )
        assert client.delete(f"/tasks/{slow}").status_code == 202
        tasks = collect(client, [*ids, slow], timeout=60)
        repeats = [
            client.post("/tasks", json={"prompt": p, "params": {"block": 0.5}}).json()
            for p in prompts[:10]
        ]
    by_prompt = dict(zip(prompts, (tasks[i] for i in ids), strict=True))
    batches = sum(metric(scrape(w), "fastapi_redis_mini_handler_batch_size_count") for w in workers)
    print(f"\nreliability[batching]: {len(prompts) + 1} tasks in {batches:.0f} batches")
    assert tasks[slow]["status"] == "CANCELLED"
    for prompt in ("bad one", "bad two"):
        assert by_prompt[prompt]["status"] == "FAILED"
        assert by_prompt[prompt]["error"] == f"ValueError: cannot read {prompt!r}"
    for prompt in prompts[:10]:
        assert by_prompt[prompt]["status"] == "DONE", by_prompt[prompt]
        assert by_prompt[prompt]["attempts"] == 1
        assert by_prompt[prompt]["result"]["upper"] == prompt.upper()
    assert batches < len(prompts) + 1  # tasks shared calls
    assert [r["cached"] for r in repeats] == [True] * 10
    assert [r["task_id"] for r in repeats] == ids[:10]


def test_two_embed_workers_answer_deterministically_from_the_real_model_and_the_cache(
    redis_url: str, launch: Launcher
) -> None:
    pytest.importorskip("wordllama", reason="the embed extra is not installed")
    from fastapi_redis_mini.core.embedding import EmbedModel

    api = launch.api(redis_url, TASK_HANDLER="embed")
    launch.workers(redis_url, 2, TASK_HANDLER="embed")
    texts = [f"a sentence about topic number {n}" for n in range(20)]
    pair = {"prompt": "The cat sits on the mat.", "params": {"pair": "A cat is sitting on a mat."}}
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        ids = submit_all(client, [{"prompt": t} for t in texts] + [pair])
        tasks = collect(client, ids, timeout=60)
        again = client.post("/tasks", json={"prompt": texts[0]}).json()
        bad = client.post("/tasks", json={"prompt": "x", "params": {"pair": 3}})
    here = EmbedModel(1)
    here.load()
    expected = here(texts, [{}] * len(texts))
    assert [tasks[i]["status"] for i in ids] == ["DONE"] * len(ids)
    # Whichever worker process answered, it is what this process computes for the text.
    assert [tasks[i]["result"] for i in ids[:-1]] == expected
    assert tasks[ids[-1]]["result"]["score"] > 0.7
    assert again["cached"] is True
    assert again["result"] == expected[0]
    assert bad.status_code == 422
    assert bad.json()["error"]["message"].startswith("params.pair")


def calls_at_once(log: Path) -> tuple[int, int]:
    """The most calls the log shows running at the same moment, and the items they held."""
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    edges = sorted(
        [(float(began), 1) for began, _, _ in calls] + [(float(end), -1) for _, end, _ in calls]
    )  # an end sorts before a begin at the same instant: touching calls did not overlap
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most, sum(int(items) for _, _, items in calls)


@pytest.mark.parametrize(("handler", "at_once"), [("OverlapModel", 2), ("OneAtATimeModel", 1)])
def test_a_worker_runs_as_many_batches_at_once_as_the_handler_allows_and_no_more(
    redis_url: str, launch: Launcher, tmp_path: Path, handler: str, at_once: int
) -> None:
    api = launch.api(redis_url)
    # Batches of 4 (max_batch_size) from 8 tasks held: two batches are there to be run.
    launch.worker(redis_url, TASK_HANDLER=f"tests.support.handlers:{handler}", MAX_CONCURRENCY="8")
    log = tmp_path / "calls.log"
    bodies = [{"prompt": f"item {n}", "params": {"block": 0.4, "log": str(log)}} for n in range(16)]
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        ids = submit_all(client, bodies)
        tasks = collect(client, ids, timeout=60)
    assert [tasks[i]["status"] for i in ids] == ["DONE"] * len(ids)
    assert [tasks[i]["result"] for i in ids] == [{"prompt": b["prompt"]} for b in bodies]
    most, items = calls_at_once(log)
    assert items == len(ids)  # every task in exactly one call
    assert most == at_once
