"""The wake-up bench's summary and its sleeper, on the machine's own scheduler."""

from __future__ import annotations

import os

import pytest

from bench.shadow_wakeup import overshoots, summary


def test_summary_is_median_and_tails() -> None:
    assert summary([float(v) for v in range(100)]) == (49.5, 90.0, 99.0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux scheduling")
@pytest.mark.timeout(60)
def test_the_sleeper_reports_one_overshoot_per_wakeup_and_keeps_its_policy() -> None:
    pid = os.fork()
    if pid == 0:  # the policy and affinity change the calling process: do it in a child
        late = overshoots(0, "batch", 20)
        ok = len(late) == 20 and all(v > -100 for v in late) and os.sched_getscheduler(0) == os.SCHED_BATCH
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
