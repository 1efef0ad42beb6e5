"""A tiny run of the benchmark harness, so `make bench` cannot rot between real runs.

The peers' section needs the bench venv (.venv-bench) and takes minutes, so it is left to
`make bench`; everything else runs here with small N against the real api and worker.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from fastapi_redis_mini_harness.cgroups import unavailable

from ..conftest import QUOTAS_OFF
from ..support.tools import require_tool
from ._run import run_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wrk_binary() -> str:
    return require_tool("wrk", "wrk")


def shell_environment() -> dict[str, str]:
    """This process's environment without what tests/conftest.py sets for the suite (the
    per-key quotas off), as a shell runs the bench: whatever the bench needs it sets itself."""
    return {key: value for key, value in os.environ.items() if key not in QUOTAS_OFF}


def test_bench_without_peers_measures_every_section_and_writes_both_reports(
    wrk_binary: str, tmp_path: Path
) -> None:
    result = run_module(
        "loadtest.bench",
        ["--sections", "api,durable,e2e,scale,memory",
         "--tasks", "100", "--scale", "1,2", "--api-workers", "1", "--api-seconds", "1",
         "--api-rounds", "2", "--e2e-tasks", "100", "--memory-tasks", "100",
         "--out", str(tmp_path)],
        timeout=300,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {e["endpoint"] for e in report["api"]["endpoints"]} == {
        "POST /tasks (miss)",
        "POST /tasks (hit)",
        "GET /tasks/{id}",
    }
    for endpoint in report["api"]["endpoints"]:
        for run in ("api_max", "bare_max", "api_paced", "bare_paced"):
            assert endpoint[run]["requests"] > 0
            assert endpoint[run]["errors"] == 0, (endpoint["endpoint"], run, endpoint[run])
        assert endpoint["errors"] == 0
        # Both servers ran in every round, and the reported ratio is one of the rounds'.
        assert len(endpoint["rounds"]["rps_ratio"]) == len(endpoint["rounds"]["p99_ratio"]) == 2
        assert endpoint["rps_ratio"] in endpoint["rounds"]["rps_ratio"]
        assert endpoint["p99_ratio"] in endpoint["rounds"]["p99_ratio"]
    assert report["e2e"]["done"] == 100
    assert [run["completed"] for run in report["scale"]["runs"]] == [100, 100]
    for appendfsync in ("everysec", "always"):
        durable = report["durable"][appendfsync]
        assert durable["errors"] == 0, durable
        assert min(durable["rps"]["none"], durable["rps"]["fsync"]) > 0
        assert durable["rps_ratio"] in durable["rounds"]
    assert report["memory"]["tasks"] == 100
    assert report["memory"]["hits"] == 100
    assert report["memory"]["after"]["redis_used_memory"] > 0
    assert "## Api throughput" in (tmp_path / "bench.md").read_text()
    assert "Targets" in result.stdout


def test_the_in_process_api_comparison_runs_both_apps_to_the_end() -> None:
    result = run_module(
        "loadtest.bench.api_ab",
        ["--rounds", "3", "--concurrency", "5", "--endpoint", "hit"],
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Every request of both apps was answered from the cache, with no error in between.
    for app in ("bare app", "api"):
        line = rf"^  {app} +[\d.]+ µs CPU per request +statuses \[200\]$"
        assert re.search(line, result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^  api extra +-?[\d.]+ µs", result.stdout, re.MULTILINE), result.stdout


def test_the_worker_comparison_drains_with_both_versions_in_turns() -> None:
    result = run_module(
        "loadtest.bench.worker_ab",
        ["--base", "HEAD", "--rounds", "2", "--tasks", "300", "--no-peer"],
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Each round drained every task with both versions, in turns: A first, then B first.
    rounds = re.findall(r"^round (\d) (A|B) .* (\d+)/300 done$", result.stdout, re.MULTILINE)
    assert [(r, v) for r, v, _ in rounds] == [("1", "A"), ("1", "B"), ("2", "B"), ("2", "A")]
    assert {done for _, _, done in rounds} == {"300"}
    assert re.search(r"^B/A by round: [\d.]+, [\d.]+; median [\d.]+$", result.stdout, re.M)


def test_the_cluster_section_measures_both_backends_and_memory_per_master(
    wrk_binary: str, tmp_path: Path
) -> None:
    result = run_module(
        "loadtest.bench",
        ["--sections", "cluster", "--tasks", "100",
         "--api-workers", "1", "--api-seconds", "1", "--api-rounds", "1",
         "--cluster-memory-tasks", "100", "--out", str(tmp_path)],
        timeout=300, env=shell_environment(),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    cluster = json.loads((tmp_path / "bench.json").read_text())["cluster"]
    runs = cluster["worker"]["runs"]
    assert [runs[name]["completed"] for name in ("standalone", "cluster")] == [100, 100]
    assert cluster["api"]["errors"] == 0, cluster["api"]
    assert min(cluster["api"]["rps"].values()) > 0
    memory = cluster["memory"]
    assert memory["tasks"] == 100
    assert len(memory["after"]) == 3  # every master, empty ones included
    # Each task leaves its hash and its cached result on the master of its slot.
    assert sum(master["keys"] for master in memory["after"].values()) >= 2 * 100
    assert "Redis Cluster: memory per master" in (tmp_path / "bench.md").read_text()


def test_the_inference_section_runs_the_real_model_and_the_accelerator_end_to_end(
    wrk_binary: str, tmp_path: Path
) -> None:
    result = run_module(
        "loadtest.bench",
        ["--sections", "inference",
         "--inference-tasks", "100", "--inference-concurrency", "16",
         "--inference-ceiling-items", "100", "--api-workers", "1",
         "--peer-python", str(tmp_path / "no-peers"), "--out", str(tmp_path)],
        timeout=300,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    inference = json.loads((tmp_path / "bench.json").read_text())["inference"]
    for model in ("embed", "accelerator"):
        runs = inference[model]
        assert runs["ceiling"]["best_rate"] > 0
        for run in ("batched", "per_task"):
            assert runs[run]["done"] == 100, (model, run, runs[run])
            assert runs[run]["rate"] > 0
            cpu = runs[run]["cpu_us_per_task"]
            assert set(cpu) == {"api", "worker", "redis", "bench"}
            assert min(cpu.values()) >= 0
    assert inference["embed"]["ceiling"]["cpu_us_per_item"] >= 0
    assert inference["embed"]["drain"]["done"] == 100
    assert inference["accelerator"]["peers"] == []
    tables = (tmp_path / "bench.md").read_text()
    assert "## Inference" in tables
    assert "CPU µs/task api/worker/Redis/bench" in tables


def test_the_scaleout_section_drains_and_submits_on_capped_clusters_and_removes_the_caps(
    wrk_binary: str, tmp_path: Path
) -> None:
    result = run_module(
        "loadtest.bench",
        ["--sections", "scaleout",
         "--scaleout-tasks", "100", "--scaleout-rounds", "1", "--scaleout-workers", "1",
         "--scaleout-api-workers", "1", "--api-seconds", "1", "--out", str(tmp_path)],
        timeout=300, env=shell_environment(),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    scaleout = json.loads((tmp_path / "bench.json").read_text())["scaleout"]
    reason = unavailable()
    if reason is not None:
        assert scaleout == {"skipped": reason}
        assert f"scaleout: skipped: {reason}" in result.stdout
        return
    runs = scaleout["drain"]["runs"]
    assert [runs[name]["completed"] for name in ("1 master", "3 masters")] == [100, 100]
    assert scaleout["api"]["errors"] == 0, scaleout["api"]
    assert min(scaleout["api"]["rps"].values()) > 0
    # One group per node, each gone once the section ends.
    assert len(scaleout["cgroups"]) == 4
    assert not any(Path(group).exists() for group in scaleout["cgroups"])
    assert "3 / 1 capped Redis masters" in (tmp_path / "bench.md").read_text()
