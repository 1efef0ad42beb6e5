"""The profiler (`make profile-worker`, `python -m loadtest.bench.profile`) on a handler of
the user's choice: a real model's tasks drained by a real worker under cProfile."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ._run import run_module

pytestmark = pytest.mark.slow


def profile(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("loadtest.bench.profile", ["worker", *args], timeout=180)


def test_a_worker_running_the_embed_model_is_sampled_with_the_models_thread_in_it(
    tmp_path: Path,
) -> None:
    pytest.importorskip("wordllama", reason="the embed extra is not installed")
    output = tmp_path / "embed.txt"
    result = profile(
        "--handler", "embed", "--tasks", "5000", "--concurrency", "16", "--collapsed",
        "--output", str(output),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    assert "queueing 5000 tasks for embed" in result.stdout
    assert "drained 5000 tasks" in result.stdout
    # py-spy sampled the thread pool too: the model's own call is in the stacks.
    assert re.search(r"__call__ \([^)]*core/embedding\.py:\d+\)", output.read_text())


def test_cprofile_says_it_cannot_see_a_synchronous_handler(tmp_path: Path) -> None:
    result = profile(
        "--handler", "embed", "--tasks", "50", "--output", str(tmp_path / "embed.prof")
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "use --collapsed or --flamegraph to see it" in result.stdout
    assert (tmp_path / "embed.prof").stat().st_size > 0


def test_params_that_are_not_a_json_object_are_refused_by_name() -> None:
    result = profile("--handler", "embed", "--params", "[1, 2]")

    assert result.returncode == 2
    assert "argument --params: must be a JSON object" in result.stderr
