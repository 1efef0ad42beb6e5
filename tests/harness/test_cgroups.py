"""CPU caps through cgroup v1: a capped process gets its share of a core, and no more."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastapi_redis_mini_harness.cgroups import CpuCap, unavailable

# Spins for at most 20 s, so a test that dies half-way leaves nothing running for long.
BUSY = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end:\n    pass\n"
CAP = 0.1
INTERVAL = 1.0


def on_cpu_seconds(pid: int) -> float:
    """Seconds the (single-threaded) process has run on a CPU, in ns resolution."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def test_a_hierarchy_without_the_cpu_controller_gives_a_reason(tmp_path: Path) -> None:
    reason = unavailable(tmp_path)
    assert reason is not None
    assert str(tmp_path) in reason


@pytest.mark.slow
def test_a_busy_process_in_a_capped_group_runs_for_its_share_of_a_core_only() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        with CpuCap("frm-test", CAP) as cap:
            cap.add(child.pid)
            assert cap.pids() == [child.pid]
            throttled_before = cap.throttling()
            began, used_before = time.monotonic(), on_cpu_seconds(child.pid)
            time.sleep(INTERVAL)
            used = on_cpu_seconds(child.pid) - used_before
            share = used / (time.monotonic() - began)
            throttled = cap.throttling().since(throttled_before)
        # Uncapped, a spinning process takes a whole core when one is free; at most one
        # period's worth of overrun is allowed on top of the cap.
        assert share <= 2 * CAP, f"the capped process ran for {share:.2f} of a core"
        assert throttled.throttled_periods > 0
        assert not cap.path.exists()
        assert child.poll() is None, "removing the group must not stop its processes"
    finally:
        child.kill()
        child.wait(timeout=10)
