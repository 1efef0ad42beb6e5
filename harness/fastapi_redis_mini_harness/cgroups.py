"""CPU caps for processes on this machine: cgroup v1's `cpu` controller (CFS bandwidth).

A `CpuCap` is one group under /sys/fs/cgroup/cpu that lets its processes run for `cores`
of a core: `cpu.cfs_quota_us` of every `cpu.cfs_period_us`. A benchmark puts a server in
one so that the server, not its clients, is what runs out of CPU on a two-core machine.

Making a group needs root and a writable cgroup v1 `cpu` hierarchy; `unavailable()` says
why there is none, so a caller can skip with the reason instead of failing half-way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CPU_HIERARCHY = Path("/sys/fs/cgroup/cpu")
# The kernel's default period; a quota below 1 ms is refused (EINVAL).
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000
REMOVE_TIMEOUT = 5.0


class CgroupUnavailableError(RuntimeError):
    """No CPU cap can be made here (no cgroup v1 `cpu` hierarchy, or not writable)."""


def unavailable(root: Path = CPU_HIERARCHY) -> str | None:
    """Why no group can be made under `root`, or None when one can (tried, then removed)."""
    if not (root / "cpu.cfs_quota_us").is_file():
        return f"{root} is not a cgroup v1 cpu hierarchy (no cpu.cfs_quota_us)"
    probe = root / f"frm-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        probe.mkdir()
    except OSError as error:
        return f"cannot make a cgroup under {root}: {error.strerror}"
    with contextlib.suppress(OSError):
        probe.rmdir()
    return None


@dataclass(frozen=True)
class Throttling:
    """cpu.stat: CFS periods the group ran in, how many of them hit the quota, for how long."""

    periods: int
    throttled_periods: int
    throttled_seconds: float

    def since(self, earlier: Throttling) -> Throttling:
        return Throttling(
            self.periods - earlier.periods,
            self.throttled_periods - earlier.throttled_periods,
            self.throttled_seconds - earlier.throttled_seconds,
        )

    @property
    def throttled_share(self) -> float:
        """The share of periods in which the group used its whole quota and had to wait."""
        return self.throttled_periods / self.periods if self.periods else 0.0


class CpuCap:
    """One cgroup, `<root>/<name>-<pid>-<random>`, made by `create()` (or `with`).

    `cores` None leaves the group uncapped, so a caller can set the cap only around the part
    it measures. `remove()` moves any process still in the group back to the root group
    (uncapped) and deletes the group; the name is unique, so runs sharing a machine never
    touch each other's groups.
    """

    def __init__(
        self,
        name: str,
        cores: float | None,
        *,
        period_us: int = PERIOD_US,
        root: Path = CPU_HIERARCHY,
    ) -> None:
        self.root = root
        self.path = root / f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
        self.period_us = period_us
        self.cores = cores

    def create(self) -> CpuCap:
        try:
            self.path.mkdir()
        except OSError as error:
            raise CgroupUnavailableError(f"cannot make {self.path}: {error.strerror}") from error
        try:
            self._write("cpu.cfs_period_us", self.period_us)
            self.set(self.cores)
        except BaseException:
            self.remove()
            raise
        return self

    def set(self, cores: float | None) -> None:
        """Cap the group at `cores` of a core from now on; None lifts the cap."""
        if cores is None:
            quota = -1
        else:
            quota = round(cores * self.period_us)
            if quota < MIN_QUOTA_US:
                raise ValueError(
                    f"{cores:g} cores is a quota of {quota} us per {self.period_us} us period;"
                    f" the kernel's least is {MIN_QUOTA_US} us"
                )
        self._write("cpu.cfs_quota_us", quota)
        self.cores = cores

    def add(self, pid: int) -> None:
        """Move process `pid`, with all its threads, into the group."""
        self._write("cgroup.procs", pid)

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def throttling(self) -> Throttling:
        fields = dict(
            line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line
        )
        return Throttling(
            periods=int(fields["nr_periods"]),
            throttled_periods=int(fields["nr_throttled"]),
            throttled_seconds=int(fields["throttled_time"]) / 1e9,
        )

    def remove(self) -> None:
        """Hand the group's processes back to the root group, then delete the group."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + REMOVE_TIMEOUT
        while True:
            for pid in self.pids():
                # A process may exit between the read and the write.
                with contextlib.suppress(OSError):
                    (self.root / "cgroup.procs").write_text(str(pid))
            try:
                self.path.rmdir()
                return
            except OSError as error:
                # EBUSY: a process was still on its way out, or was forked into the group.
                if error.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def _write(self, name: str, value: int) -> None:
        (self.path / name).write_text(str(value))

    def __enter__(self) -> CpuCap:
        return self.create()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()
