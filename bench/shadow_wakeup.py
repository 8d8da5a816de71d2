"""Why the shadow worker runs under SCHED_IDLE: how late a thread that wakes up gets its core when
a CPU-bound process at nice 19, or under SCHED_IDLE, holds it, for a waking thread under
SCHED_BATCH (the service's handler threads) and under the default policy.

    python -m bench.shadow_wakeup [--wakeups 3000] [--core 1]

The sleeper and the hog are pinned to one core (Linux only). Each wake-up sleeps 1 ms; the
figures are how much later than that the sleeper ran again (medians and tails of all wake-ups),
then the same with the hog at the other priority, all in one run. No sluice code runs: this is
the kernel's scheduler alone, the mechanism bench.shadow measures through a real service.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HOGS = ("none", "nice", "idle")
WAKERS = ("batch", "other")


def _set_policy(policy: str) -> None:
    """``nice``: nice 19 under the default policy; ``idle``: SCHED_IDLE; ``batch``: SCHED_BATCH;
    ``other``: the default policy."""
    if policy in ("nice", "idle"):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    if policy == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if policy == "batch":
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    if policy == "other":
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def hog(core: int, policy: str) -> None:
    os.sched_setaffinity(0, {core})
    _set_policy(policy)
    while True:
        pass


def overshoots(core: int, policy: str, wakeups: int, sleep_s: float = 0.001) -> list[float]:
    """Microseconds each wake-up came later than asked."""
    os.sched_setaffinity(0, {core})
    _set_policy(policy)
    late = []
    for _ in range(wakeups):
        started = time.perf_counter()
        time.sleep(sleep_s)
        late.append((time.perf_counter() - started - sleep_s) * 1e6)
    return late


def summary(late: list[float]) -> tuple[float, float, float]:
    """(median, p90, p99) of the overshoots."""
    ordered = sorted(late)
    return (statistics.median(ordered), ordered[int(len(ordered) * 0.9)], ordered[int(len(ordered) * 0.99)])


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--hog":
        hog(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wakeups", type=int, default=3000)
    parser.add_argument("--core", type=int, default=1)
    args = parser.parse_args()
    if not hasattr(os, "SCHED_IDLE"):
        raise SystemExit("needs Linux scheduling policies")
    print("| waking thread | hog on its core | late p50 µs | p90 µs | p99 µs |")
    print("|---|---|---:|---:|---:|")
    load = os.getloadavg()
    for waker in WAKERS:
        for policy in HOGS:
            proc = None
            if policy != "none":
                proc = subprocess.Popen([sys.executable, "-m", "bench.shadow_wakeup", "--hog", str(args.core), policy])
                time.sleep(0.3)
            try:
                p50, p90, p99 = summary(overshoots(args.core, "batch" if waker == "batch" else "other",
                                                   args.wakeups))
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait(10)
            hog_name = {"none": "none", "nice": "nice 19", "idle": "SCHED_IDLE"}[policy]
            waker_name = "SCHED_BATCH" if waker == "batch" else "SCHED_OTHER"
            print(f"| {waker_name} | {hog_name} | {p50:,.0f} | {p90:,.0f} | {p99:,.0f} |", flush=True)
    print(f"\n{os.cpu_count()} cores; load average before: {', '.join(f'{v:.2f}' for v in load)}")


if __name__ == "__main__":
    main()
