"""CPU accounting from /proc, to tell a slow server from a busy machine.

The benchmark pins the server to one core and h2load to another, but anything else running on the
machine (a test suite, a build) can still take those cores. ``CoreProbe`` measures, over one
measurement, how busy the server core was with work that was *not* the server's process group;
``wait_for_quiet`` waits (bounded) for the cores to calm down before a point is measured.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def core_ticks(core: int) -> tuple[int, int]:
    """(busy, total) clock ticks of one core since boot, from /proc/stat."""
    prefix = f"cpu{core} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
            return total - idle, total
    raise ValueError(f"no cpu{core} line in /proc/stat")


def group_ticks(pgid: int) -> int:
    """utime + stime clock ticks of the live processes in process group ``pgid``."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()  # fields[0] is the state (3rd field of the file)
        if len(fields) > 12 and int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (14th, 15th fields)
    return ticks


def single_core(cpu_list: str | None) -> int | None:
    """The core number when a taskset list names exactly one core, else None."""
    if cpu_list is None or not cpu_list.strip().isdigit():
        return None
    return int(cpu_list)


def launch_prefix(cpu_list: str | None, nice: int = 0) -> list[str]:
    """``taskset -c CPUS`` (pinning) and ``nice -n N`` (priority; negative needs root) for a command."""
    prefix = ["taskset", "-c", cpu_list] if cpu_list else []
    if nice:
        prefix += ["nice", "-n", str(nice)]
    return prefix


def autogroup_nice(pid: int | str) -> int | None:
    """Current autogroup nice of ``pid`` (None where autogroups are off)."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split("nice")[-1])
    except (OSError, ValueError):
        return None


def set_autogroup_nice(pid: int | str, nice: int) -> bool:
    """Give the scheduler autogroup (= session) of ``pid`` the nice value ``nice``.

    With ``kernel.sched_autogroup_enabled=1`` a process's nice value only ranks it inside its own
    session; sessions compete with each other by their autogroup nice. So ``--nice`` is applied here too:
    to the harness's session (which holds h2load and the in-process loop) and to each server's session.
    Returns False where autogroups are off or the write is refused.
    """
    path = Path(f"/proc/{pid}/autogroup")
    if not path.exists():
        return False
    try:
        path.write_text(f"{nice}\n")
    except OSError:
        return False
    return True


@dataclass
class CoreProbe:
    """Share of ``core`` spent outside process group ``pgid`` (None: pgid not tracked)."""

    core: int
    pgid: int | None = None
    _busy: int = 0
    _total: int = 0
    _group: int = 0

    def start(self) -> None:
        self._busy, self._total = core_ticks(self.core)
        self._group = group_ticks(self.pgid) if self.pgid is not None else 0

    def stop(self) -> tuple[float, float]:
        """(busy fraction of the core, fraction used by others than the group) since start()."""
        busy, total = core_ticks(self.core)
        group = group_ticks(self.pgid) if self.pgid is not None else 0
        span = max(total - self._total, 1)
        busy_frac = (busy - self._busy) / span
        other = busy_frac - (group - self._group) / span if self.pgid is not None else busy_frac
        return busy_frac, max(other, 0.0)


def busy_fractions(cores: list[int], interval: float = 1.0) -> list[float]:
    before = [core_ticks(c) for c in cores]
    time.sleep(interval)
    after = [core_ticks(c) for c in cores]
    return [(a[0] - b[0]) / max(a[1] - b[1], 1) for a, b in zip(after, before, strict=True)]


def wait_for_quiet(cores: list[int], max_wait: float, threshold: float = 0.15) -> float:
    """Wait until every core in ``cores`` is below ``threshold`` busy (sampled over 1 s), at most
    ``max_wait`` seconds. Returns the highest busy fraction seen in the last sample."""
    if not cores or max_wait <= 0:
        return 0.0
    deadline = time.monotonic() + max_wait
    while True:
        worst = max(busy_fractions(cores))
        if worst < threshold or time.monotonic() >= deadline:
            return worst


def clock_ticks_per_second() -> int:
    return int(os.sysconf("SC_CLK_TCK"))
